"""`vop demo`: the paper's Table 1 and Figure 1 in miniature, on the embedded synthetic world;
`vop demo --ablations`: its ablation study."""
from vop.demo.run import DemoSettings, run_demo
from vop.demo.ablations import run_ablations

__all__ = ["DemoSettings", "run_demo", "run_ablations"]
