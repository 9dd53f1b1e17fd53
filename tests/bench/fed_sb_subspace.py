# How much of what FedIT learns lies in fed-sb's frozen subspaces: for FedIT's final update ΔW = B_f·A_f (its
# exported global adapter) and each fed-sb run's version 0 (B m×r, A r×n, orthonormal), ‖Bᵀ·ΔW·Aᵀ‖²/‖ΔW‖², mean over
# seeds per module kind, beside what a subspace drawn at random keeps on average, min(1, r/m)·min(1, r/n).
#   fed_sb_subspace.py OUT_DIR "SEEDS"   (OUT_DIR as fed_sb_init.sh leaves it; standard library only)
import json, struct, sys, array
def load(p):
    with open(p, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); data = f.read()
    out = {}
    for k, v in h.items():
        if k == '__metadata__': continue
        a = array.array('f'); a.frombytes(data[v['data_offsets'][0]:v['data_offsets'][1]])
        r, c = v['shape']; out[k] = [list(a[i*c:(i+1)*c]) for i in range(r)]
    return out
def mm(x, y):
    yt = list(zip(*y)); return [[sum(a*b for a, b in zip(row, col)) for col in yt] for row in x]
def t(x): return [list(r) for r in zip(*x)]
def fro2(x): return sum(v*v for r in x for v in r)
root, seeds = sys.argv[1], sys.argv[2].split()
res = {}
for s in seeds:
    f = load(f'{root}/fedit-s{s}/export/global/adapter_model.safetensors')
    for init in ('sketch', 'dense', 'random'):
        d = f'{root}/fed-sb-{init}-s{s}'
        sha = json.load(open(f'{d}/ledger.json'))['versions'][0]['blobs'][0]['sha256']
        g = load(f'{d}/blobs/{sha}')
        for k in f:
            if not k.endswith('lora_A.weight'): continue
            base = k[:-len('lora_A.weight')]
            af, bf = f[k], f[base + 'lora_B.weight']
            a, b = g[k], g[base + 'lora_B.weight']            # A r×n, B m×r
            dw_in = mm(mm(t(b), bf), mm(af, t(a)))            # Bᵀ·B_f·A_f·Aᵀ
            gram = fro2(mm(bf, af))
            mod = base.split('.')[-2]
            res.setdefault((init, mod), []).append(fro2(dw_in) / gram)
            m, n, r = len(b), len(a[0]), len(a)
            res.setdefault(('chance', mod), []).append(min(1, r/m) * min(1, r/n))
for key in sorted(res, key=lambda k: (k[1], k[0])):
    v = res[key]; print('%-10s %-7s %.3f' % (key[1], key[0], sum(v) / len(v)))
