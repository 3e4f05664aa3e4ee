"""ReviewKD's ABF review path (transferlab.losses.connectors.ReviewABF) against a PyTorch peer.

Golden file: tests/parity/data/connectors/abf.npz, written by
tests/parity/make_connector_goldens.py (PyTorch float64; see its docstring). Outputs,
gradients w.r.t. the student features and w.r.t. every weight must agree with the
peer; float32 here, through two BatchNorms per level, so rtol 1e-4. The connector is a
model layer (its convs follow the backend's default precision, TF32 on recent GPUs, as
PyTorch's cuDNN convs do by default), so the comparison pins float32 products: it checks
the math, on any backend (bench/gpu_check.sh's `tests` stage runs it on a GPU).
"""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from transferlab.losses import connectors

# TRANSFERLAB_PARITY_DATA=DIR with DIR/connectors/abf.npz (make_connector_goldens.py --seed N
# --out DIR/connectors): a golden drawn on other shapes and inputs; else the committed one.
_OTHER = os.path.join(os.environ.get("TRANSFERLAB_PARITY_DATA", ""), "connectors", "abf.npz")
GOLDEN = (_OTHER if os.environ.get("TRANSFERLAB_PARITY_DATA") and os.path.isfile(_OTHER)
          else os.path.join(os.path.dirname(__file__), "parity", "data", "connectors", "abf.npz"))


def test_abf_review_path_matches_pytorch_peer():
    with np.load(GOLDEN) as z:
        g = {k: z[k] for k in z.files}
    n = sum(1 for k in g if k.startswith("student_"))
    feats = [jnp.asarray(g[f"student_{i}"]) for i in range(n)]
    t_shapes = [tuple(int(d) for d in g[f"teacher_shape_{i}"]) for i in range(n)]
    module = connectors.create_connector("abf", t_shapes)
    variables = module.init({"params": jax.random.PRNGKey(0)}, feats, train=False)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    golden = {k[len("param:"):]: v for k, v in g.items() if k.startswith("param:")}
    assert set(flat) == set(golden), (sorted(flat), sorted(golden))
    params = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in golden.items()}, sep="/")
    cots = [jnp.asarray(g[f"cot_{i}"]) for i in range(n)]

    def objective(params, feats):
        outs, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, feats, train=True,
                               mutable=["batch_stats"])
        return sum(jnp.sum(o * c) for o, c in zip(outs, cots)), outs

    with jax.default_matmul_precision("float32"):
        (_, outs), (g_params, g_feats) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, feats)
    for i in range(n):
        np.testing.assert_allclose(outs[i], g[f"out_{i}"], rtol=1e-4, atol=1e-4, err_msg=f"output {i}")
        np.testing.assert_allclose(g_feats[i], g[f"grad_{i}"], rtol=1e-4, atol=1e-4, err_msg=f"input grad {i}")
    flat_grads = flax.traverse_util.flatten_dict(g_params, sep="/")
    for name, value in flat_grads.items():
        np.testing.assert_allclose(value, g[f"gparam:{name}"], rtol=1e-4, atol=1e-4, err_msg=name)
