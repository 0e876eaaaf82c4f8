"""optim.py - the optimizers, written out: AdamW and Muon (phase 4, read before train.py).

What you will learn
  * AdamW: two running moments, bias correction, decoupled weight decay (none on norms,
    biases, embeddings: gpt.param_groups), equal step for step to torch.optim.AdamW;
  * Muon: momentum, then five Newton-Schulz steps that orthogonalize each hidden matrix's
    update, so every direction of the matrix moves by about the same amount; embeddings, the
    head, norms and biases stay on AdamW. Equal step for step to torch.optim.Muon;
  * make_optimizer: which parameters go to which rule, from train.py's options
    (--optimizer=ours|torch|fused|muon, --muon_lr, --muon_momentum, --muon_weight_decay,
    --muon_split_qkv: attention's fused Q, K, V matrix orthogonalized as three blocks);
  * what a Muon step costs on a CPU, and the options that make it cheaper without changing
    the rule: --muon_ns_dtype=float32, --muon_adamw_fused (docs/speedrun.md).

Run it
  python optim.py            # AdamW and Muon fit the same matrix; the update's singular values
  python optim.py --steps=50 # before and after Newton-Schulz; a few seconds
train.py uses it (`python train.py --optimizer=muon`); the checks are
`python -m pytest test_all.py -k test_optim_`.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import math

import torch
from torch.optim.adamw import adamw as torch_adamw  # the functional form: fused_adamw_group

import gpt

# demo hyperparameters (python optim.py --name=value)
dim = 64                 # the demo fits a dim x dim matrix W to a teacher's
n_samples = 256          # training inputs (rows of X)
condition = 100.0        # the inputs' largest scale over their smallest (ill-conditioning)
steps = 200              # optimizer steps for each of AdamW and Muon
adamw_lr = 0.1           # the best of 1e-2, 3e-2, 0.1 on this problem
muon_lr = 0.05           # the best of 0.02, 0.05, 0.1 on this problem
seed = 0


# ----------------------------------------------------------------------------- AdamW
class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), one tensor at a time. For
    each parameter p with gradient g, at step t = 1, 2, ...:
        m = b1*m + (1-b1)*g          running mean of the gradient (momentum)
        v = b2*v + (1-b2)*g*g        running mean of its square (a per-weight scale)
        p = p - lr*wd*p              decay the weight itself, not through the gradient
        p = p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    m and v start at zero, so early on they are too small: dividing by 1-b^t undoes that.
    The state uses torch.optim.AdamW's names, so checkpoints move between the two."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        # decoupled_weight_decay: unused here, but torch.optim.AdamW loading our state needs it
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            self.step_group(group)

    def step_group(self, group):  # also Muon's, for its AdamW groups (it only uses self.state)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, self.state[p]
            if not state:  # m is exp_avg, v is exp_avg_sq
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
            m, v = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            t = state["step"].item()
            m.lerp_(g, 1 - b1)                             # m + (1-b1)*(g - m)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.mul_(1 - lr * wd)
            denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


# ----------------------------------------------------------------------------- Muon
# torch.optim.Muon's defaults (Keller Jordan's Muon, 2024): the quintic's coefficients, the
# normalisation's eps and the number of Newton-Schulz steps
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_STEPS = 5


def newton_schulz(G, steps=NS_STEPS, coefficients=NS_COEFFICIENTS, eps=NS_EPS,
                  dtype=torch.bfloat16):
    """G (m, n) -> U S' V^T where G = U S V^T: G's singular vectors, every singular value
    moved into a band around 1 (0.68 to 1.21), i.e. roughly the orthogonal matrix nearest G.

    Why it works: X X^T = U S^2 U^T, so one step X <- a X + b (X X^T) X + c (X X^T)^2 X keeps
    the singular vectors and maps each singular value s to p(s) = a s + b s^3 + c s^5. Dividing
    by the Frobenius norm first puts every s in (0, 1]. p is steep at 0 (a = 3.4445: a small s
    grows 3.4x a step) yet stays within [0.68, 1.21] once s is near 1, so 5 steps lift
    every s above 0.0015 into the band (smaller ones, a sliver of a gradient, stay smaller).
    A true sign function (all s = 1) would need many more steps; the direction is what
    matters, so torch and modded-nanogpt settle for this band. Worked example:
    s = 0.01 -> 0.034 -> 0.118 -> 0.40 -> 1.09 -> 0.70.
    Only matrix products: fast on a GPU, and fine in bf16 (torch's choice, the default here).
    A wide X keeps X X^T small: a tall G is transposed first (min(m, n) squared)."""
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)     # every singular value <= ||X||_F = 1
    for _ in range(steps):
        A = X @ X.T                      # (m, m), m = the short side
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)           # a X + B X = p applied to each s
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for the 2-D weights inside the blocks. For
    each such weight W (A, B) with gradient g, at every step:
        buf = mu*buf + (1-mu)*g            momentum: an average of recent gradients
        u   = (1-mu)*g + mu*buf            Nesterov: look one step further along it
        O   = newton_schulz(u)             same directions, every singular value ~1
        W   = W - lr*wd*W                  decoupled weight decay, as AdamW
        W   = W - lr * sqrt(max(1, A/B)) * O
    Why orthogonalize: a gradient matrix is dominated by a few directions (its top singular
    values); plain momentum moves mostly along them. O moves every direction the gradient
    has by the same amount, so the rare ones learn as fast as the common ones. sqrt(max(1,
    A/B)) keeps the size of each output's change comparable across shapes.
    Why only hidden 2-D weights: "singular directions" mean something for a matrix mapping
    activations to activations. An embedding is a lookup table (each row its own token's
    vector, updated only when the token appears) and the head reads those rows back; norms'
    gains and biases are vectors. Those stay on AdamW.

    One optimizer, two kinds of groups, so one state_dict holds everything and train.py's
    checkpoints resume it like AdamW: a group with adamw=True is updated by AdamW's rule
    (betas, eps, weight_decay of its own); the others by Muon's. train.py's schedule sets
    every group's lr to the AdamW curve; a Muon group multiplies it by lr_scale (muon_lr /
    lr), so both follow the same shape at their own height.
    A group with split=[r1, r2, ...] cuts each of its matrices into row blocks of r1, r2, ...
    rows and orthogonalizes (and lr-scales) each block alone, as if it were its own matrix:
    make_optimizer uses it for attention's c_attn, whose rows are Q, K and V stacked (one
    matmul, three maps; --muon_split_qkv, measured in docs/speedrun.md).
    Equal to torch.optim.Muon (same defaults, same bf16 Newton-Schulz) step for step. Cheaper
    on a CPU: ns_dtype="float32" (small bf16 matmuls are slow there) and, for an adamw=True
    group, fused=True (fused_adamw_group: one kernel for all its tensors)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=NS_EPS, ns_steps=NS_STEPS,
                 adjust_lr_fn=None, ns_dtype="bfloat16"):
        super().__init__(params, dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, lr_scale=1.0, adamw=False, split=None,
            betas=(0.9, 0.95), decoupled_weight_decay=True, fused=False))
        for group in self.param_groups:
            shapes = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
            if shapes and not group["adamw"]:
                raise ValueError(f"Muon updates 2-D weights only; got shapes {shapes} "
                                 "(give vectors and embeddings to an adamw=True group)")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["adamw"]:
                (fused_adamw_group if group.get("fused") else AdamW.step_group)(self, group)
                continue
            lr, wd, mu = group["lr"] * group["lr_scale"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:  # torch.optim.Muon's name
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                u = g.lerp(buf, mu) if group["nesterov"] else buf
                p.mul_(1 - lr * wd)
                # split: row blocks (attention's Q, K, V) each orthogonalized on its own
                for rows, block in zip(p.split(group.get("split") or p.size(0)),
                                       u.split(group.get("split") or u.size(0))):
                    O = newton_schulz(block, group["ns_steps"], group["ns_coefficients"],
                                      group["eps"], getattr(torch, group["ns_dtype"]))
                    rows.add_(O, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], rows.shape))

    def load_state_dict(self, state_dict):
        """torch's, plus one clear line for a state saved by another optimizer (AdamW)."""
        kinds = [g.get("adamw") for g in state_dict.get("param_groups", [])]
        if len(kinds) != len(self.param_groups) or None in kinds:
            raise ValueError("the checkpoint's optimizer state is not this Muon's (saved with "
                             "another --optimizer?); resume with the same --optimizer")
        super().load_state_dict(state_dict)


def fused_adamw_group(opt, group):
    """AdamW.step_group's update, every tensor of the group in one call of torch's fused
    kernel: the same formula, and the same state (exp_avg, exp_avg_sq, a float step tensor), so
    it is a drop-in for the loop above; on a CPU the loop's ~10 small ops per tensor (36 tensors
    in the speedrun model) cost ~20x the fused call. Equal to the loop to float rounding."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if not opt.state[p]:
            opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                exp_avg_sq=torch.zeros_like(p))
    states = [opt.state[p] for p in params]
    (b1, b2), lr = group["betas"], group["lr"]
    torch_adamw(
        params, [p.grad for p in params], [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=True,
        amsgrad=False, beta1=b1, beta2=b2, lr=lr, weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=False)


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch.optim.Muon's lr adjustment for a weight of shape (A, B): "original" (the default,
    Keller Jordan's) sqrt(max(1, A/B)); "match_rms_adamw" (Moonshot's) 0.2 sqrt(max(A, B)),
    which makes the update's RMS match AdamW's, so AdamW's lr can be reused."""
    A, B = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; expected None, 'original' or "
                     "'match_rms_adamw'")


def hidden_matrices(model):
    """The weights Muon is for: 2-D, trainable, neither an embedding table nor the LM head."""
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    lookup |= {id(head.weight)} if head is not None else set()
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2
            and id(p) not in lookup]


def qkv_splits(model, ids):
    """{id(c_attn.weight): (Q rows, K rows, V rows)} for each attention whose fused weight is
    among ids (block.py stacks n_head query heads, then n_kv_head key and value heads)."""
    out = {}
    for m in model.modules():
        w = getattr(getattr(m, "c_attn", None), "weight", None)
        if w is not None and id(w) in ids:
            q, kv = m.n_head * m.head_dim, m.n_kv_head * m.head_dim
            out[id(w)] = (q, kv, kv)
    return out


def make_optimizer(model, c, device_type):
    kw = dict(lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8)
    if c.optimizer == "muon":  # Muon for the hidden matrices, AdamW (ours) for the rest
        hidden = hidden_matrices(model)
        if not hidden:
            raise ValueError("--optimizer=muon: this model has no 2-D hidden weights for Muon "
                             "(only embeddings, head, norms); use --optimizer=fused")
        if c.lr <= 0:
            raise ValueError(f"--optimizer=muon needs --lr > 0 (Muon's lr is muon_lr / lr times "
                             f"the schedule), got {c.lr}")
        mine = {id(p) for p in hidden}
        rest = [dict(g, params=[p for p in g["params"] if id(p) not in mine], adamw=True,
                     fused=c.muon_adamw_fused, **kw)
                for g in gpt.param_groups(model, c.weight_decay)]
        qkv = qkv_splits(model, mine) if c.muon_split_qkv else {}
        kw_muon = dict(lr=c.lr, lr_scale=c.muon_lr / c.lr, momentum=c.muon_momentum,
                       weight_decay=c.muon_weight_decay, ns_dtype=c.muon_ns_dtype,
                       ns_steps=c.muon_ns_steps)
        muon = [dict(params=[p for p in hidden if id(p) not in qkv], **kw_muon)]
        for split in sorted(set(qkv.values())):  # one group per Q, K, V shape (all alike in GPT)
            muon.append(dict(params=[p for p in hidden if qkv.get(id(p)) == split],
                             split=list(split), **kw_muon))
        return Muon([g for g in muon + rest if g["params"]])
    if c.optimizer == "fused":  # one kernel over all tensors (CPU and CUDA since torch 2.4)
        kw["fused"] = device_type in ("cpu", "cuda")
    return (AdamW if c.optimizer == "ours" else torch.optim.AdamW)(
        gpt.param_groups(model, c.weight_decay), **kw)


# ----------------------------------------------------------------------------- demo
def teacher_problem(gen):
    """X (n_samples, dim) and Y = X @ T for a random orthogonal T. X's features are correlated:
    its scales spread log-evenly over [1/condition, 1] along random (not per-coordinate)
    directions, so the gradient is dominated by a few directions and AdamW's per-weight
    scaling cannot even them out; Muon's orthogonalization does."""
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    T, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    S = torch.logspace(0, -math.log10(condition), dim, dtype=torch.float64)
    X = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64) * S @ U.T
    return X, X @ T


def fit(opt_class, lr, X, Y, **kw):
    """Least squares from W = 0 with one optimizer, lr decayed linearly to 0 (a constant-size
    Muon step would circle the minimum at a distance of about lr): the loss at 5 points."""
    W = torch.nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))
    opt = opt_class([dict(params=[W], **kw)], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps + 1):
        loss = ((X @ W - Y) ** 2).mean()
        if step % max(1, steps // 4) == 0 or step == steps:
            losses.append((step, loss.item()))
        opt.zero_grad()
        loss.backward()
        opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        opt.step()
    return losses


def main():
    cli.check(globals(), [("dim", dim >= 2, "at least 2"), ("n_samples", n_samples >= 1, "at least 1"),
                          ("condition", condition >= 1, ">= 1"), ("steps", steps >= 1, "at least 1"),
                          ("adamw_lr", adamw_lr > 0, "> 0"), ("muon_lr", muon_lr > 0, "> 0")])
    cli.fits_in_memory(8 * (n_samples * dim * 4 + dim * dim * 12), f"--dim={dim} --n_samples={n_samples}")
    X, Y = teacher_problem(torch.Generator().manual_seed(seed))
    W = torch.zeros(dim, dim, dtype=torch.float64, requires_grad=True)
    ((X @ W - Y) ** 2).mean().backward()
    before = torch.linalg.svdvals(W.grad)
    after = torch.linalg.svdvals(newton_schulz(W.grad).double())
    show = lambda s: ", ".join(f"{v:.3g}" for v in (s[0], s[dim // 4], s[dim // 2], s[-1]))
    print(f"the first gradient of a {dim} x {dim} least-squares fit (inputs' condition "
          f"{condition:g}); singular values, largest, 1/4, 1/2, smallest:")
    print(f"  gradient            {show(before)}   (largest / smallest {before[0] / before[-1]:.3g})")
    print(f"  after Newton-Schulz {show(after)}   (all in [{after[-1]:.2f}, {after[0]:.2f}])")
    print("AdamW moves each weight by about lr; Muon moves every singular direction by about lr.")
    runs = {"AdamW": fit(AdamW, adamw_lr, X, Y, betas=(0.9, 0.95)),
            "Muon": fit(Muon, muon_lr, X, Y)}
    print("step  " + "  ".join(f"{name:>10}" for name in runs) + "   (mean squared error)")
    for i, (step, _) in enumerate(runs["AdamW"]):
        print(f"{step:4d}  " + "  ".join(f"{r[i][1]:10.3g}" for r in runs.values()))


if __name__ == "__main__":
    cli.run(main, globals())
