"""needle.static: declarative graphs (TensorFlow 1 style) on the same core as eager mode.

Declare first, then run: ``with st.Graph(): x = st.placeholder((None, 3)); y = ndl.exp(x)``,
then ``st.Session().run(y, feed_dict={x: ...})``. Every ``ndl.ops`` function, Tensor
operator and ``nn.Module`` applied to graph tensors makes nodes without computing anything.
"""

from . import dot
from .control import cond, while_loop
from .gradients import gradients
from .graph import Graph, get_default_graph, load_graph, reset_default_graph
from .nodes import Constant, Placeholder, Variable, constant, placeholder
from .session import RunMetadata, RunOptions, RunPlan, Session
from .state_ops import (
    assign,
    assign_add,
    assign_sub,
    group,
    minimize,
    print_,
    state_updates,
    with_dependencies,
)

__all__ = [
    "Constant", "Graph", "Placeholder", "RunMetadata", "RunOptions", "RunPlan", "Session",
    "Variable",
    "assign", "assign_add", "assign_sub", "cond", "constant", "dot",
    "get_default_graph", "gradients", "group", "load_graph", "minimize", "placeholder",
    "print_",
    "reset_default_graph", "state_updates", "while_loop", "with_dependencies",
]
