import os
import sys

# The spawned ranks import the case modules by name: make this folder importable for them too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
