#!/usr/bin/python3
"""LoRA-FAIR as the paper's code solves it: PyTorch autograd on dense m×n matrices, plain SGD on ΔB from 0.

    loss = 1 - cosine_similarity(ΔW*.flatten(), ((B̄ + ΔB) @ Ā).flatten()) + λ‖ΔB‖²,  1000 steps, lr 0.01

The benchmark peer of `fedlora aggregate --method lora-fair`, run on Debian's python3-torch (2 threads). Reads the
same PEFT directories (F32 safetensors; uniform weights) and prints each module's objective (in float64) and the
seconds it took, as lora_fair_dense does.
"""
import argparse
import json
import math
import struct
import time

import numpy as np
import torch


def read_adapter(path):
    with open(f"{path}/adapter_config.json") as f:
        config = json.load(f)
    with open(f"{path}/adapter_model.safetensors", "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", "this peer reads F32 adapters"
        begin, end = info["data_offsets"]
        tensors[name] = torch.from_numpy(
            np.frombuffer(data[base + begin : base + end], dtype=np.float32).reshape(info["shape"]).copy())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return tensors, scaling


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    clients = [read_adapter(d) for d in args.inputs]
    p = 1.0 / len(clients)
    modules = sorted(n[: -len(".lora_A.weight")] for n in clients[0][0] if n.endswith(".lora_A.weight"))
    for module in modules:
        a = [t[f"{module}.lora_A.weight"] for t, _ in clients]
        b = [s * t[f"{module}.lora_B.weight"] for t, s in clients]
        target = sum(p * bk @ ak for ak, bk in zip(a, b))
        a_bar = sum(p * ak for ak in a)
        b_bar = sum(p * bk for bk in b)
        delta_b = torch.zeros_like(b_bar, requires_grad=True)
        optimizer = torch.optim.SGD([delta_b], lr=args.lr)
        for _ in range(args.steps):
            optimizer.zero_grad()
            w = (b_bar + delta_b) @ a_bar
            loss = 1 - torch.nn.functional.cosine_similarity(target.flatten(), w.flatten(), dim=0) \
                + args.lam * delta_b.pow(2).sum()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            w = ((b_bar + delta_b) @ a_bar).double()
            t = target.double()
            objective = 1 - (w * t).sum() / (w.norm() * t.norm()) + args.lam * delta_b.double().pow(2).sum()
        name = module[len("base_model.model."):]
        print(f"module {name} objective {objective.item():.9f}")
    print(f"seconds {time.perf_counter() - start:.3f}")


if __name__ == "__main__":
    main()
