"""Programs as data: export a traced function or module, save it, load it where the code that
built it is absent, and run it eagerly, in a declared graph or under the JIT."""

from .encoding import ProgramError
from .exported import ExportedProgram, export, load_program

__all__ = ["ExportedProgram", "ProgramError", "export", "load_program"]
