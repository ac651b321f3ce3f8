"""Quantize a Flax NNX model you wrote with afpq-jax through qwix: PTQ, QAT, save and restore (README section
"Quantizing your own Flax model"). Runs in a few seconds on a CPU: python examples/quantize_own_model.py"""

import tempfile

import jax
import jax.numpy as jnp
import optax
import qwix
from flax import nnx

import afpq_jax as aq
from afpq_jax.qwix import AfpqRule, PtqProvider, QatProvider, packed_weights, restore_state, save_state


class MLP(nnx.Module):  # qwix's getting-started model
    def __init__(self, din, dmid, dout, *, rngs):
        self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
        self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


x = jax.random.normal(jax.random.key(0), (8, 256))
y = jax.random.normal(jax.random.key(1), (8, 16))
model = MLP(256, 512, 16, rngs=nnx.Rngs(0))
rules = [AfpqRule(module_path="linear1", scheme=aq.QuantScheme.create("nf3", group_size=128)),  # AFPQ NF3
         AfpqRule(module_path=".*", scheme=aq.QuantScheme.create("fp4", group_size=128))]      # the rest FP4

# 1. QAT: the same training loop, the forward through fake_quant (straight-through gradient)
qat = qwix.quantize_model(model, QatProvider(rules), x)
opt = nnx.Optimizer(qat, optax.adam(1e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss


for step in range(20):
    loss = train_step(qat, opt)
print(f"QAT loss after 20 steps: {float(loss):.4f}")

# 2. PTQ: packed weights (codes + s_pos/s_neg per group), matmuls on the fused kernel
ptq = qwix.quantize_model(qat, PtqProvider(rules), x)
for path, w in packed_weights(ptq).items():
    print(f"{path}: {w.qt}")
print("max |PTQ - QAT| logits:", float(jnp.abs(ptq(x) - qat(x)).max()))

# 3. Save the packed state; restore it into an abstract PTQ model of the same class and rules
with tempfile.TemporaryDirectory() as tmp:
    manifest = save_state(ptq, f"{tmp}/mlp")
    print(f"saved {manifest['packed']['bits_per_weight']:.3f} bits per quantized weight")
    abstract = nnx.eval_shape(lambda: qwix.quantize_model(MLP(256, 512, 16, rngs=nnx.Rngs(0)), PtqProvider(rules),
                                                          x))
    restored = restore_state(abstract, f"{tmp}/mlp")
    assert bool(jnp.all(restored(x) == ptq(x)))
    print("restored: identical outputs")
