"""How far an int8 teacher's next-token distribution is from the teacher's own, on held-out tokens.

  python scripts/int8_teacher_fidelity.py [--config configs/tiny_logit.py] [--markdown]

On every held-out row of the config's data (data.make_loader split "eval", all of them) and at every trained token,
the teacher's distribution p (as loaded: float32, then bfloat16) and q, the same teacher loaded with
`teacher.quantize="int8"` (`jaxkd.models.quantize`: the decoder's linear layers int8 with a float32 scale per output
channel, dequantised in the compute dtype). Reported: KL(p || q) in nats per token (mean, 99th percentile, max) and
the share of tokens whose most likely next token is the same.

The rows below the first measure the choices `jaxkd.models.quantize` made, with the same quantiser applied to the
weight and dequantised back into the float model (what an int8 parameter computes): the output head and the embedding
table quantised too (a scale per vocabulary row for both), and a scale per tensor instead of per output channel.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_logit.py"))
  parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from cache_fidelity import held_out, print_table  # pylint: disable=import-outside-toplevel  (the sibling script)
  from jaxkd import models, program  # pylint: disable=import-outside-toplevel
  from jaxkd.models import quantize  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_default_matmul_precision", "highest")  # the float32 teacher's own figures, not TF32-like
  c, vocab, batches = held_out(args.config)
  folder = program.model_folder(c.teacher)

  def log_probs(model):
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, ids, seg, pos: jax.nn.log_softmax(
        nnx.merge(graphdef, params)(ids, segment_ids=seg, positions=pos)[..., :vocab].astype(jnp.float32), axis=-1))
    out = [np.asarray(forward(params, b["input_ids"], b["segment_ids"], b["positions"]), np.float64)[b["loss_mask"] > 0]
           for b in batches]
    return np.concatenate(out)

  def round_trip(w, per_tensor=False):
    """w quantised as an int8 parameter holds it (`quantize.quantize_kernel`) and dequantised back in float32."""
    if per_tensor:
      s = jnp.maximum(jnp.max(jnp.abs(w)) / 127.5, jnp.finfo(jnp.float32).tiny)
      return (jnp.clip(jnp.round(w / s), -128, 127) * s).astype(w.dtype)
    q, s = quantize.quantize_kernel(w)
    return (q.astype(jnp.float32) * s).astype(w.dtype)

  def variant(dtype, *, head=False, embed=False, per_tensor=False):
    model = models.from_pretrained(folder, dtype=dtype)
    if per_tensor:
      for part, names in quantize.TARGETS.items():
        for name in names:
          var = getattr(getattr(model.layers, part), name).kernel
          var.set_value(jax.vmap(lambda w: round_trip(w, per_tensor=True))(var[...]))  # a scale per layer
    else:
      quantize.quantize(model, "int8")
    if head:  # [D, V]: a scale per vocabulary column
      model.lm_head.kernel.set_value(round_trip(model.lm_head.kernel[...]))
    if embed:  # [V, D]: a scale per vocabulary row
      model.embed_tokens.embedding.set_value(round_trip(model.embed_tokens.embedding[...].T).T)
    return model

  def kl_row(name, p, q):
    kl = (np.exp(p) * (p - q)).sum(1)
    same = float((p.argmax(1) == q.argmax(1)).mean())
    return [name, f"{kl.mean():.2e}", f"{np.quantile(kl, 0.99):.2e}", f"{kl.max():.2e}", f"{same:.4f}"]

  rows = []
  p32 = log_probs(models.from_pretrained(folder, dtype="float32"))
  p16 = log_probs(models.from_pretrained(folder, dtype="bfloat16"))
  n = len(p32)
  rows.append(kl_row("float32 teacher || int8 (float32 compute)", p32, log_probs(variant("float32"))))
  rows.append(kl_row("bfloat16 teacher || int8 (bfloat16 compute)", p16, log_probs(variant("bfloat16"))))
  rows.append(kl_row("for scale: float32 teacher || bfloat16 teacher", p32, p16))
  rows.append(kl_row("float32 || int8 and the output head int8", p32, log_probs(variant("float32", head=True))))
  rows.append(kl_row("float32 || int8 and the embedding int8", p32, log_probs(variant("float32", embed=True))))
  rows.append(kl_row("float32 || int8, head and embedding int8", p32,
                     log_probs(variant("float32", head=True, embed=True))))
  rows.append(kl_row("float32 || int8 with a scale per tensor", p32, log_probs(variant("float32", per_tensor=True))))

  entropy = float(-(np.exp(p32) * p32).sum(1).mean())
  print(f"{args.config}: {n} held-out trained tokens in {len(batches)} batches, vocabulary {vocab}, teacher {folder}; "
        f"the float32 teacher's mean entropy {entropy:.3f} nats")
  header = ["p || q", "mean KL (nats)", "p99 KL", "max KL", "same argmax"]
  print_table(header, rows, markdown=args.markdown)


if __name__ == "__main__":
  main()
