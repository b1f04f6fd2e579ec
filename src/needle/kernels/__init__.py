"""Kernels: how the ops in core/ compute fast (im2col, Winograd, layouts, threads, numba loops).

The layer below core/: it may import needle.backend, never needle.core or anything above it.
An op's ``compute`` states the math and calls one function here; each choice of algorithm and
each fallback ladder (numba -> NumPy, Winograd -> im2col, channels-last -> plain NumPy) is
written once, in the module that owns it:

    conv.py            the three convolutions: the algorithm choice, im2col, col2im, threads
    winograd.py        3x3 stride-1 convolutions by Winograd's F(4x4, 3x3), blocked and threaded
    numba_winograd.py  its numba tile transforms (and the kernel gradient's chunk loop)
    numba_parallel_winograd.py  the kernel gradient's chunks in one prange region (TBB)
    numba_direct_conv.py  direct convolution loops (register tiles, no im2col) for 16-64 channels
    conv_bn_relu.py    a conv and its kernel gradient reading relu(batch_norm(x)), made where
                       the direct loops or Winograd read their input (never stored)
    openblas_gemm.py   NumPy's own OpenBLAS gemm as a ctypes function, for numba loops
    numba_gemm.py      one call of it on numba arrays (the arguments NumPy's matmul passes)
    numba_intrinsics.py  LLVM-level helpers for numba loops: stack tiles, 512-bit vectors, prefetch
    blas_policy.py     OpenBLAS held on one thread for a jitted plan with large products,
                       those split into blocks (numba_parallel_gemm.py) on numba's threads
    blas_threads.py    BLAS's thread count held at one, process-wide, counted across threads
    linear.py          a dense layer's product with its bias, residual add and ReLU in each
                       block's epilogue (numba_parallel_gemm.py)
    reduce.py          sums and statistics over axes (einsum, column sums); the JIT's sum code
    softmax.py         logsumexp and softmax over the last axis in cache-sized row blocks
    index_add.py       rows added into a table at ids (an Embedding's backward; numba -> NumPy)
    cross_entropy.py   softmax cross-entropy of small logits and its gradient (numba -> NumPy)
    batchnorm.py       BatchNorm's statistics, affine map and backward (numba -> NumPy)
    layout.py          per-channel work on channels-last memory (rows of a multiple of C)
    rnn.py             an LSTM layer over a whole sequence, forward and backward (numba -> NumPy)
    numba_rnn.py       its numba loops: a layer's whole recurrence per block of batch rows
    numba_parallel_rnn.py  those blocks in one prange region (TBB)
    numba_tanh.py      a float32 tanh that vectorizes inside numba loops
    cpu_kernels.py     the compiled loops' entry points: None where numba cannot run them
    numba_kernels.py   those loops (imported only where numba is installed)
    threaded_elementwise.py  relu, its gradient and the bias add of large arrays, threaded
    vocab_head.py      a language model's head and softmax loss fused (one logits array)
    running_average.py BatchNorm's running statistics updated in one loop (same bits)
    random_mask.py     Dropout's 0/1 mask: NumPy's draw, then one loop (+ numba_*.py; same bits)
    attention.py, layernorm.py (+ numba_*.py)  fused attention and layer norm row loops
    pool.py            max pooling over k x k windows and its two adjoints
    recycle.py         giant outputs reused between steps instead of page-faulted in again
"""
