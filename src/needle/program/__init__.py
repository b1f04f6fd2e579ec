"""Programs as data: export a traced function or module, save it, load it where the code that
built it is absent, and run it eagerly, in a declared graph or under the JIT."""

from .encoding import ProgramError
from .exported import ExportedProgram, export, load_program
from .graph_io import GraphReader, GraphWriter, load_graph, save_graph

__all__ = ["ExportedProgram", "GraphReader", "GraphWriter", "ProgramError", "export",
           "load_graph", "load_program", "save_graph"]
