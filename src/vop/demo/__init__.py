"""`vop demo`: the paper's Table 1 and Figure 1 in miniature, on the embedded synthetic world."""
from vop.demo.run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
