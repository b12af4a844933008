"""Parameter groups and the framework-neutral parts of Muon+AdamW, shared by the torch and MLX
optimizers (backends/muon_torch.py, backends/muon_mlx.py) so both apply the same update.

Imports neither torch nor mlx. `param_groups` sorts the model's parameters by name into AdamW
groups (embeddings, value embeddings, lm_head, the per-layer scalars) and Muon groups (the 2-D
matrices of the transformer blocks, one group per distinct shape so each group runs as one batched
computation). `polar_express` is written with only `@`, `*`, `+` and `.mT`, which torch tensors
and MLX arrays share, so both frameworks run literally the same orthogonalisation.
"""

import math
import re

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): per-iteration (a, b, c) of the odd quintic
# p(X) = a X + b X Xᵀ X + c (X Xᵀ)² X, tuned for 5 iterations with a 2% safety factor.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Dividing by 1.02 x the Frobenius norm puts every singular value below 1, inside the interval
# the coefficients were tuned for; the epsilon keeps an all-zero gradient finite.
POLAR_NORM_SAFETY = 1.02
POLAR_NORM_EPS = 1e-6
MUON_MOMENTUM = 0.95
MUON_BETA2 = 0.95            # NorMuon second-moment decay
SECOND_MOMENT_FLOOR = 1e-10  # NorMuon: rsqrt of at least this, and the floor of the norm ratio
ADAM_EPS = 1e-10
X0_LAMBDA_BETAS = (0.96, 0.95)
RESID_LAMBDA_LR_SCALE = 0.01
REFERENCE_MODEL_DIM = 768    # the LRs were tuned at this width; AdamW LRs scale by its inverse sqrt

BLOCK_PARAM = re.compile(r"transformer\.h\.\d+\.")
VALUE_EMBED_PARAM = re.compile(r"value_embeds\.\d+\.weight")
# torch.compile wraps the model and prefixes its parameter names with this.
COMPILED_PREFIX = "_orig_mod."
NAMING_RULES = (
    "transformer.wte.weight, value_embeds.<i>.weight, lm_head.weight, resid_lambdas, x0_lambdas, "
    "or a 2-D transformer.h.<i>.* matrix"
)


def param_groups(named_shapes, model_dim, *, matrix_lr, embedding_lr, unembedding_lr, scalar_lr,
                 weight_decay, adam_betas, ns_steps=5):
    """Group dicts for MuonAdamW from {name: shape}; names as in model.named_parameters().

    AdamW groups: {"kind": "adamw", "names", "lr", "initial_lr", "weight_decay", "betas", "eps"}.
    Muon groups:  {"kind": "muon", "names", "lr", "initial_lr", "weight_decay", "momentum",
                   "ns_steps", "beta2", "shape"}, one per distinct matrix shape.
    Raises ValueError naming any parameter that fits no rule.
    """
    if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps={ns_steps}: Polar Express has coefficients for 1 to "
                         f"{len(POLAR_EXPRESS_COEFFS)} steps; pick a value in that range")
    scale = (model_dim / REFERENCE_MODEL_DIM) ** -0.5
    adamw = {  # role -> (lr, betas); the order here is the order of the groups
        "lm_head": (unembedding_lr * scale, adam_betas),
        "wte": (embedding_lr * scale, adam_betas),
        "value_embeds": (embedding_lr * scale, adam_betas),
        "resid_lambdas": (scalar_lr * RESID_LAMBDA_LR_SCALE, adam_betas),
        "x0_lambdas": (scalar_lr, X0_LAMBDA_BETAS),
    }
    adamw_names = {role: [] for role in adamw}
    matrix_names = {}  # shape -> names
    for name, shape in named_shapes.items():
        role = _param_role(name, tuple(shape))
        if role == "matrix":
            matrix_names.setdefault(tuple(shape), []).append(name)
        else:
            adamw_names[role].append(name)

    groups = []
    for role, (lr, betas) in adamw.items():
        if adamw_names[role]:
            groups.append({"kind": "adamw", "names": adamw_names[role], "lr": lr, "initial_lr": lr,
                           "weight_decay": 0.0, "betas": tuple(betas), "eps": ADAM_EPS})
    for shape in sorted(matrix_names):
        groups.append({"kind": "muon", "names": matrix_names[shape], "lr": matrix_lr,
                       "initial_lr": matrix_lr, "weight_decay": weight_decay,
                       "momentum": MUON_MOMENTUM, "ns_steps": ns_steps, "beta2": MUON_BETA2,
                       "shape": shape})
    return groups


def _param_role(name, shape):
    """Which optimizer rule a parameter falls under; ValueError if none does."""
    bare = name.removeprefix(COMPILED_PREFIX)
    if bare == "transformer.wte.weight":
        return "wte"
    if bare == "lm_head.weight":
        return "lm_head"
    if bare in ("resid_lambdas", "x0_lambdas"):
        return bare
    if VALUE_EMBED_PARAM.fullmatch(bare):
        return "value_embeds"
    if BLOCK_PARAM.match(bare) and len(shape) == 2:
        return "matrix"
    raise ValueError(f"no optimizer rule for parameter {name!r} with shape {shape}: name it "
                     f"{NAMING_RULES} (block parameters must be 2-D)")


def muon_lr_scale(rows, cols):
    """Muon's LR multiplier: tall matrices get sqrt(rows/cols) so their per-element update RMS
    matches that of square and wide ones."""
    return math.sqrt(max(1.0, rows / cols))


def normuon_axis(rows, cols):
    """Axis NorMuon averages squared updates over: along each row (one statistic per row) when
    rows >= cols, else along each column."""
    return -1 if rows >= cols else -2


def second_moment_shape(count, rows, cols):
    """Shape of a Muon group's NorMuon buffer for `count` stacked [rows, cols] matrices."""
    return (count, rows, 1) if rows >= cols else (count, 1, cols)


def polar_express(X, ns_steps):
    """Orthogonalise a batch of matrices X [..., rows, cols] (already divided by
    POLAR_NORM_SAFETY x their Frobenius norm, in the compute dtype): drives every singular value
    towards 1. Works on torch tensors and MLX arrays alike. The Gram matrix is built on the
    smaller side so each matmul costs as little as the shape allows."""
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
        else:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X
