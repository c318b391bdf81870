"""PyInstaller runtime hook: llama-cpp-python finds the llama.cpp libraries shipped in the bundle."""

import os
import sys

os.environ.setdefault("LLAMA_CPP_LIB_PATH", os.path.join(sys._MEIPASS, "llama_cpp", "lib"))  # type: ignore[attr-defined]
