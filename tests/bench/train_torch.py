"""The PyTorch peer of train_bench: the same SmolLM2-135M-shaped Llama (random weights), the same
LoRA (r 16, alpha 32) on q,v or all seven linears, AdamW on the adapter only, batch 4, random
tokens, loss on every position, timed over --steps steps after one warm-up step.

The model is Hugging Face's LlamaForCausalLM forward (eager attention, rotate_half RoPE, SwiGLU,
RMSNorm, tied head) written out in plain torch, since Debian has PyTorch (python3-torch, 1.13 on
OpenBLAS) but not transformers. Prints one JSON line with tokens_per_second.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

H, I, L, HQ, HKV, D, V, THETA, EPS = 576, 1536, 30, 9, 3, 64, 49152, 100000.0, 1e-5


class Lora(torch.nn.Module):
    """W0 frozen; y = x W0ᵀ + s (x Aᵀ) Bᵀ, A kaiming-uniform as PEFT, B = 0."""

    def __init__(self, out_f, in_f, adapted, r=16, alpha=32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(out_f, in_f) * 0.02, requires_grad=False)
        self.adapted = adapted
        if adapted:
            bound = 1 / math.sqrt(in_f)
            self.a = torch.nn.Parameter(torch.empty(r, in_f).uniform_(-bound, bound))
            self.b = torch.nn.Parameter(torch.zeros(out_f, r))
            self.s = alpha / r

    def forward(self, x):
        y = F.linear(x, self.w)
        if self.adapted:
            y = y + self.s * F.linear(F.linear(x, self.a), self.b)
        return y


def rms_norm(x, g):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * g


def rotate_half(x):
    return torch.cat((-x[..., D // 2:], x[..., : D // 2]), dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, targets):
        super().__init__()
        self.g1 = torch.nn.Parameter(torch.ones(H), requires_grad=False)
        self.g2 = torch.nn.Parameter(torch.ones(H), requires_grad=False)
        self.q = Lora(HQ * D, H, "q" in targets)
        self.k = Lora(HKV * D, H, "k" in targets)
        self.v = Lora(HKV * D, H, "v" in targets)
        self.o = Lora(H, HQ * D, "o" in targets)
        self.gate = Lora(I, H, "gate" in targets)
        self.up = Lora(I, H, "up" in targets)
        self.down = Lora(H, I, "down" in targets)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        h = rms_norm(x, self.g1)
        q = self.q(h).view(b, t, HQ, D).transpose(1, 2)
        k = self.k(h).view(b, t, HKV, D).transpose(1, 2)
        v = self.v(h).view(b, t, HKV, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(HQ // HKV, dim=1)
        v = v.repeat_interleave(HQ // HKV, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(D) + mask
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, HQ * D))
        h = rms_norm(x, self.g2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(torch.nn.Module):
    def __init__(self, targets):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(V, H) * 0.02, requires_grad=False)
        self.layers = torch.nn.ModuleList(Layer(targets) for _ in range(L))
        self.norm = torch.nn.Parameter(torch.ones(H), requires_grad=False)

    def forward(self, ids):
        t = ids.shape[1]
        inv_freq = 1.0 / (THETA ** (torch.arange(0, D, 2).float() / D))
        freqs = torch.outer(torch.arange(t).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embed[ids]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        logits = rms_norm(x, self.norm) @ self.embed.t()
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--targets", choices=["qv", "all"], default="qv")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    targets = {"q", "v"} if a.targets == "qv" else {"q", "k", "v", "o", "gate", "up", "down"}
    model = Model(targets)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, V, (a.steps + 1, a.batch, a.seq))
    for step in range(a.steps + 1):
        if step == 1:
            start = time.perf_counter()
        loss = model(ids[step])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_second": a.batch * a.seq * a.steps / seconds,
                      "seconds": seconds, "loss": loss.item(), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
