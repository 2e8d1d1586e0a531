"""Run under torchrun: one DDP step of the contrastive loss on this rank's half of a fixed batch;
rank 0 saves the averaged gradients. Also runnable without torchrun (one process, whole batch)."""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import vop
from vop.engine.distributed import DistEnv
from vop.engine.loss import contrastive_loss


class Wrap(torch.nn.Module):  # DDP needs forward() to produce everything that needs gradients
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, video, tokens):
        return self.m(video, tokens)


def main(out: str, method: str) -> None:
    env = DistEnv.from_env()
    env.setup(torch.device("cpu"))
    torch.manual_seed(0)
    model = vop.create_model(method, vop.build_clip("tiny", seed=0), frames=4)
    g = torch.Generator().manual_seed(1)
    video = torch.randn(8, 4, 3, 32, 32, generator=g)
    tokens = model.tokenizer(16)([f"caption {i} of a red circle" for i in range(8)])
    per = 8 // env.world_size
    sl = slice(env.rank * per, (env.rank + 1) * per)
    net = DDP(Wrap(model)) if env.enabled else Wrap(model)
    v, t = net(video[sl], tokens[sl])
    # a pairwise model (cma's query score) is scored by its similarity over the gathered (B, F, D) frames
    loss = contrastive_loss(v, t, model.logit_scale, model.similarity if model.pairwise else None)
    loss.backward()
    if env.is_main:
        torch.save({n: p.grad for n, p in model.named_trainable_parameters()} | {"__loss": loss.detach()}, out)
    env.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
