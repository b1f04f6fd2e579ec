"""The core: op registry, primitives and reverse-mode autodiff; the only code defining ops."""
