"""Every config key with its default and meaning, and the start-of-run checks of their values.

Config files in `configs/` start from `base_config()` and change what their experiment needs; the
returned ConfigDict is locked, so a misspelt `--config.key=value` override fails instead of being ignored.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxkd import distributed, hidden, losses, optim, sharding, step
from jaxkd.data import config as data_config
from jaxkd.models import attention as attention_lib
from jaxkd.models import hf_io, quantize
from jaxkd.models import lora as lora_lib
from jaxkd.models import transformer as transformer_lib

NONFINITE = ("skip", "stop")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/run"
  c.steps = 100
  c.seed = 0
  c.log_every = 1  # metrics.jsonl / TensorBoard every this many steps
  c.progress = True  # progress bar on a terminal (JAXKD_PROGRESS=1 forces it elsewhere)
  c.checkpoint_every = 50  # and always at the end
  c.max_to_keep = 3
  c.eval_every = 0  # 0: only at the end (held-out data: data.eval_fraction / data.eval_split, data.eval_batches)
  # A workdir holding a run of a different config is refused (the error names the keys that differ); True
  # moves that run to <workdir>.replaced-<time> and starts afresh. Nothing is ever deleted.
  c.overwrite = False
  # A step whose loss or gradients hold NaN or Inf never changes the parameters or optimizer state. "skip":
  # go on (metric skipped_nonfinite counts them); "stop": end the run with an error naming the step.
  c.nonfinite = "skip"

  c.student = ml_collections.ConfigDict()
  c.student.path = ""  # HF folder, hub id, or tiny:NAME
  c.student.tokenizer = ""  # default: the student's folder
  c.student.param_dtype = "float32"  # master weights
  c.student.compute_dtype = "bfloat16"
  c.student.remat = "none"  # none | full | dots | dots_no_batch | dots_no_batch_attention
  # auto: cuDNN flash attention on GPU (bf16/fp16), Pallas splash on TPU, XLA elsewhere | xla | cudnn | splash
  c.student.attention = "auto"
  # LoRA (jaxkd/models/lora.py): rank > 0 trains low-rank adapters beside the targeted projections and nothing
  # else; the student's own weights stay as loaded (read from student.path on every start, never checkpointed),
  # and the optimizer holds moments for the adapters alone. The export merges them into the weights.
  c.student.lora = ml_collections.ConfigDict()
  c.student.lora.rank = 0  # 0: off (the whole student trains)
  c.student.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank (1 at rank 16)
  c.student.lora.dropout = 0.0  # on the adapters' input while training (PEFT's default: none)
  c.student.lora.targets = "q,k,v,o,gate,up,down"  # comma-separated; every linear layer of a block, as QLoRA

  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = ""
  c.teacher.tokenizer = ""
  c.teacher.dtype = "bfloat16"  # parameters and compute
  c.teacher.attention = "auto"
  # A folder made by `python -m jaxkd.capture` (the teacher's top-k log-probs over this run's data): the run then
  # loads no teacher model and distils from it (jaxkd/teacher_cache). "" runs the teacher beside the student.
  c.teacher.cache = ""
  # "int8": the teacher's decoder linear layers (q, k, v, o, gate, up, down) held as int8 with a float32 scale per
  # output channel, quantised as they are read and dequantised inside each matmul (jaxkd/models/quantize.py): about
  # half a bf16 teacher's HBM, at a held-out KL from it measured in BENCHMARKS.md ("An int8 teacher"). "": off.
  c.teacher.quantize = ""

  c.distill = ml_collections.ConfigDict()
  c.distill.kind = "forward_kl"  # forward_kl | reverse_kl | jsd | tvd | skew_kl
  c.distill.alpha = 0.5  # loss = alpha * KD + (1 - alpha) * CE; 0 = plain SFT (no teacher)
  # 2.0, the seed paper's (DistillKit's) setting for 7B -> 1.5B: a softened teacher passes on how it ranks the
  # plausible next tokens, which its argmax alone does not. A student too small to fit that tail does better
  # at 1.0 (configs/tiny_logit.py; BENCHMARKS.md, "Does distillation beat SFT?"). The one default: LossConfig and
  # the fused loss take it from here.
  c.distill.temperature = 2.0
  c.distill.beta = 0.5  # jsd mixture weight
  c.distill.skew = 0.1  # skew_kl mixture weight
  c.distill.teacher_top_k = ml_collections.FieldReference(None, field_type=int)
  # With a cached teacher (teacher.cache), how the vocabulary outside its stored top-k counts (losses.MISSING_MASS):
  # "bucket" (one more category holding the teacher's rest: the student keeps the teacher's confidence) or
  # "renormalize" (both renormalised over the k tokens).
  c.distill.missing_mass = "bucket"
  c.distill.vocab_size = ml_collections.FieldReference(None, field_type=int)  # default: the tokenizer's size
  c.distill.fused = True  # chunked loss that never builds [tokens, vocab] logits
  # Tokens per chunk of the fused loss (and of the capture's top-k); 0: as many as keep a chunk's float32 logits and
  # gradients near chunk_budget_mib on each device, whatever the vocabulary (fused_loss.chunk_for: 256 tokens at
  # Qwen2's 151,936 columns, 1,280 at 32,000). Each chunk reads the heads' weights again: where a chip has memory to
  # spare, a budget of 4096 (1,152 tokens at Qwen2's vocabulary) keeps those reads from bounding the loss's speed
  # (BENCHMARKS.md, "The chunk's metrics, and the work one trip does").
  c.distill.chunk_size = 0
  c.distill.chunk_budget_mib = 1024
  # Hidden-state distillation: loss = hidden.weight * hidden + alpha * KD + (1 - alpha) * CE. With
  # distill.kind = "hidden" there is no logit term (the only choice when the tokenizers differ).
  c.distill.hidden = ml_collections.ConfigDict()
  c.distill.hidden.weight = 0.0  # 0: off
  c.distill.hidden.loss = "mse"  # mse | cosine
  c.distill.hidden.layer_norm = False  # normalise both hidden states (no parameters) before the loss
  # [[student, teacher], ...] hidden-state indices (0 = embeddings, L = last layer); None: every student
  # layer paired with the evenly spaced teacher layer, last with last.
  c.distill.hidden.layer_map = ml_collections.FieldReference(None, field_type=list)
  # On-policy distillation (GKD; jaxkd/on_policy.py): on a share of the steps the student completes the batch's
  # prompts itself and learns the teacher's distribution on its own tokens (the divergence alone, alpha taken as
  # 1). Needs the teacher model (not teacher.cache) and logit distillation. Sampling defaults are TRL's GKDTrainer's.
  c.distill.on_policy = ml_collections.ConfigDict()
  c.distill.on_policy.fraction = 0.0  # lambda: the share of steps on sampled completions; 0: off
  c.distill.on_policy.seq_kd = False  # the teacher writes the completions (sequence-level KD), with alpha's mix
  # N; prompts keep their last data.seq_len - N tokens. 0: TRL's 128, at most half of data.seq_len.
  c.distill.on_policy.max_new_tokens = 0
  c.distill.on_policy.temperature = 0.9  # 0: greedy
  c.distill.on_policy.top_p = 1.0
  c.distill.on_policy.top_k = 0  # 0: all tokens
  c.distill.on_policy.prompts_per_row = 1  # conversations of each packed row completed (the first ones)
  # Steps up to this one are all on the dataset: a random student's samples teach little, and GKD starts from a
  # fine-tuned student (scripts/kd_vs_sft.py: on_policy_kd_late).
  c.distill.on_policy.start_step = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4
  c.optimizer.schedule = "cosine"  # cosine | linear | constant
  c.optimizer.warmup_steps = 10
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0
  c.optimizer.micro_batches = 1  # gradient accumulation inside the step

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1: all remaining devices
  c.mesh.tensor = 1

  from jaxkd import data  # pylint: disable=import-outside-toplevel
  c.data = data.default_data_config()
  with c.data.unlocked():
    c.data.seq_len = 256  # tokens per packed row
    c.data.batch_size = 8  # rows per step, over all processes

  # At the end, a few held-out prompts answered greedily by the student and the teacher, printed after the
  # held-out metrics and kept in summary.json (needs held-out data: data.eval_fraction or data.eval_split).
  c.samples = ml_collections.ConfigDict()
  c.samples.count = 3  # 0: none
  c.samples.max_new_tokens = 64

  # Ahead of time: "" trains. A TPU slice (v4-8, v5e-16, v5p-8, v6e-8, ...) or a topology ("v5p:2x2x1")
  # compiles this run's exact step for it instead, prints the memory a chip needs against its HBM and trains
  # nothing (jaxkd/aot.py; needs the `tpu` extra). Exit status 0 when it fits, 1 when not.
  c.aot = ml_collections.ConfigDict()
  c.aot.topology = ""
  # With a topology: find the largest data.batch_size whose step fits a chip, compiling as few times as it can
  # (a line through two compiles predicts the next; the answer is one that compiles and one row-step more that
  # does not), and the cheapest of aot.remat_choices that fits data.batch_size; prints every compile it tried.
  c.aot.search = False
  c.aot.remat_choices = ""  # comma-separated student.remat policies the search may use; "" = student.remat
  c.aot.max_batch = 4096  # rows: the search's upper bound

  # python -m jaxkd.capture: the teacher's top-k over this run's training rows, once (jaxkd/capture.py).
  c.capture = ml_collections.ConfigDict()
  c.capture.dir = ""
  # Log-probs stored per trained token. 128: 327 bytes a token at Qwen2's 151,936 ids, under DistillKit's
  # recommended scheme's 344 at half its KL (BENCHMARKS.md, "Teacher cache"); 64 halves the bytes.
  c.capture.top_k = 128
  # Nats between the stored log-probs' levels (jaxkd/teacher_cache/codec.py): each is kept within this of the
  # teacher's, as a uint8 gap below the most likely (so down to 255 steps below it). 1/16 adds under a tenth to the
  # KL that keeping only the top-k costs; 1/8 adds two fifths (scripts/cache_fidelity.py, BENCHMARKS.md).
  c.capture.logprob_step = 0.0625
  c.capture.rows = 0  # training rows to capture; 0: all a run of `steps` steps reads
  c.capture.shard_batches = 16  # batches a shard holds (the unit a rerun resumes from)

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True
  c.export.dtype = "bfloat16"
  # A LoRA student's adapters also as a PEFT folder (workdir/export_adapter), which
  # peft.PeftModel.from_pretrained(base, folder) loads onto the unchanged base model.
  c.export.lora_adapter = False

  # Several processes (one per host; see jaxkd.distributed). Empty coordinator and no JAX_COORDINATOR_ADDRESS:
  # a single process. "auto": JAX detects Slurm, Open MPI or Cloud TPU.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator = ""  # host:port of process 0, the same for every process
  c.distributed.num_processes = 0  # 0: from JAX_NUM_PROCESSES
  c.distributed.process_id = -1  # -1: from JAX_PROCESS_ID
  c.distributed.heartbeat_timeout_s = 100  # a process silent this long counts as dead: the others abort
  c.distributed.initialization_timeout_s = 300  # how long to wait for every process to join

  # Test hooks, for the tests of interruptions and multi-process runs; leave them at their defaults.
  c.debug = ml_collections.ConfigDict()
  c.debug.save_delay_s = 0.0  # hold every checkpoint save open this long (to kill a process mid-save)
  c.debug.step_delay_s = 0.0  # sleep this long after each step (so a signal lands mid-run on a fast machine)
  c.debug.start_delay_s = 0.0  # sleep this long in start-up, models loaded, before the data (a signal lands there)
  c.debug.poison_step = 0  # > 0: that step's targets are out of the vocabulary, so its loss is NaN
  c.debug.data_processes = 0  # > 0 on one process: read the data as this many processes would, rows joined
  return c


def tiny_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What every tiny config shares: float32 on a CPU, the bundled chats, about a minute of training."""
  c.steps = 60
  c.checkpoint_every = 20
  c.student.compute_dtype = "float32"
  c.teacher.dtype = "float32"
  c.distill.chunk_size = 256
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 5
  c.data.eval_fraction = 0.05  # the same held-out rows in every tiny config (data.eval_seed = 0)
  c.data.eval_batches = 4
  c.data.seq_len = 128
  c.data.batch_size = 8
  return c


def hub_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What the configs of real hub models share: bf16 compute, rematerialised layers, 4k-token rows."""
  c.steps = 5000
  c.checkpoint_every = 500
  c.eval_every = 500
  c.student.compute_dtype = "bfloat16"
  c.student.remat = "dots_no_batch_attention"
  c.teacher.dtype = "bfloat16"
  c.optimizer.lr = 2e-5
  c.optimizer.warmup_steps = 100
  c.data.seq_len = 4096
  c.data.batch_size = 64
  c.data.eval_fraction = 0.01
  c.data.eval_batches = 16
  return c


def load(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path`, with dotted overrides ({"data.seq_len": 64}) applied."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"jaxkd_config_{name}", path)
  if spec is None or not os.path.exists(path):
    raise ConfigError(f"no config file at {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return apply_overrides(module.get_config(), overrides or {})


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets each dotted key ("optimizer.lr") to its value; an unknown key raises ConfigError."""
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    try:
      for part in parents:
        node = node[part]
      if last not in node:
        raise KeyError(last)
      node[last] = value
    except KeyError:
      raise ConfigError(f"config.{key}: no such key (base_config in jaxkd/config_base.py lists them all)") from None
  return c


def aot_remat_choices(c) -> list[str]:
  """The remat policies `aot.search` may use, least recomputation first."""
  asked = [p.strip() for p in c.aot.remat_choices.split(",") if p.strip()] or [c.student.remat]
  order = transformer_lib.REMAT_BY_COST
  return sorted(dict.fromkeys(asked), key=lambda p: order.index(p) if p in order else len(order))


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def validate(c) -> None:
  """Start-of-run checks that need no model or data (those come when they are loaded)."""
  def need(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.{key}={_get(c, key)!r}: {msg}")

  need(0.0 <= c.distill.alpha <= 1.0, "distill.alpha", "must be in [0, 1] (0 = SFT only, 1 = KD only)")
  kinds = (*losses.KD_KINDS, "hidden")
  need(c.distill.kind in kinds, "distill.kind", f"unknown; use one of {', '.join(kinds)}")
  need(c.distill.hidden.weight >= 0, "distill.hidden.weight", "must be >= 0 (0 turns it off)")
  need(c.distill.hidden.loss in hidden.LOSSES, "distill.hidden.loss", f"use one of {hidden.LOSSES}")
  if c.distill.kind == "hidden":
    need(c.distill.hidden.weight > 0, "distill.hidden.weight",
         'must be > 0 with distill.kind="hidden" (it is the only distillation term)')
  problem = losses.hparam_problem(c.distill.kind, c.distill.temperature, c.distill.beta, c.distill.skew,
                                  c.distill.teacher_top_k)
  if problem:
    need(False, f"distill.{problem[0]}", problem[1])
  for side in ("student", "teacher"):
    need(c[side].attention in attention_lib.IMPLEMENTATIONS, f"{side}.attention",
         f"use one of {', '.join(attention_lib.IMPLEMENTATIONS)} (auto picks per platform)")
  need(c.student.remat in transformer_lib.REMAT_POLICIES, "student.remat",
       f"use one of {', '.join(sorted(transformer_lib.REMAT_POLICIES))}")
  _check_lora(c, need)
  need(c.nonfinite in NONFINITE, "nonfinite",
       '"skip" skips a step with NaN/Inf loss or gradients and counts it, "stop" ends the run there')
  need(c.max_to_keep >= 1, "max_to_keep", "must be >= 1 (the checkpoints kept; older ones are deleted)")
  need(c.distributed.heartbeat_timeout_s >= 1, "distributed.heartbeat_timeout_s",
       "must be >= 1 (seconds of silence after which a process counts as dead)")
  need(c.distributed.initialization_timeout_s >= 1, "distributed.initialization_timeout_s", "must be >= 1")
  need(c.debug.save_delay_s >= 0, "debug.save_delay_s", "must be >= 0 (a test hook; leave it 0)")
  need(c.debug.step_delay_s >= 0, "debug.step_delay_s", "must be >= 0 (a test hook; leave it 0)")
  need(c.debug.start_delay_s >= 0, "debug.start_delay_s", "must be >= 0 (a test hook; leave it 0)")
  need(c.debug.data_processes >= 0, "debug.data_processes", "must be >= 0 (a test hook; leave it 0)")
  if c.debug.data_processes:
    need(c.data.batch_size % c.debug.data_processes == 0, "data.batch_size",
         f"must be divisible by debug.data_processes={c.debug.data_processes}")
  try:
    distributed.settings(c.distributed)
  except distributed.DistributedConfigError as e:
    raise ConfigError(str(e)) from None
  need(c.steps >= 1, "steps", "must be >= 1")
  need(c.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
  need(c.log_every >= 1, "log_every", "must be >= 1 (metrics are written every this many steps)")
  need(c.eval_every >= 0, "eval_every", "must be >= 0 (0: evaluate only at the end)")
  dtypes = (*sorted(hf_io.DTYPES), "auto")
  for key in ("student.param_dtype", "student.compute_dtype", "teacher.dtype"):
    need(_get(c, key) in dtypes, key, f"use one of {', '.join(dtypes)}")
  need(c.export.dtype in dtypes or c.export.dtype is None, "export.dtype",
       f"use one of {', '.join(dtypes)}, or None (the trained parameters' dtype)")
  for axis in sharding.MESH_AXES:
    need(c.mesh[axis] >= 1 or c.mesh[axis] == -1, f"mesh.{axis}",
         "must be >= 1, or -1 for all the devices the other axes leave")
  need(c.samples.count >= 0, "samples.count", "must be >= 0 (0: no closing samples)")
  need(c.samples.max_new_tokens >= 1, "samples.max_new_tokens", "must be >= 1")
  if c.aot.topology:
    from jaxkd import aot  # pylint: disable=import-outside-toplevel
    try:
      aot.parse_slice(c.aot.topology)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  need(not c.aot.search or c.aot.topology, "aot.search", "needs aot.topology, the slice to search for")
  bad = [p for p in aot_remat_choices(c) if p not in transformer_lib.REMAT_POLICIES]
  need(not bad, "aot.remat_choices", f"{bad} unknown; use comma-separated {', '.join(transformer_lib.REMAT_BY_COST)}")
  need(c.aot.max_batch >= 1, "aot.max_batch", "must be >= 1 (rows)")
  need(c.capture.top_k >= 1, "capture.top_k", "must be >= 1")
  need(c.capture.rows >= 0, "capture.rows", "must be >= 0 (0: all a run of `steps` steps reads)")
  need(c.capture.shard_batches >= 1, "capture.shard_batches", "must be >= 1")
  need(c.capture.logprob_step > 0, "capture.logprob_step", "must be > 0 (nats, e.g. 0.0625)")
  need(c.distill.missing_mass in losses.MISSING_MASS, "distill.missing_mass",
       f"use one of {', '.join(losses.MISSING_MASS)}")
  need(not quantize.mode_problem(c.teacher.quantize), "teacher.quantize", quantize.mode_problem(c.teacher.quantize))
  need(not (c.teacher.quantize and c.teacher.cache), "teacher.quantize",
       "quantises the teacher model, but teacher.cache loads none (the cache holds its log-probs already); unset one")
  if c.teacher.cache:
    need(c.distill.kind in losses.KD_KINDS and c.distill.hidden.weight == 0, "teacher.cache",
         "holds the teacher's log-probs, for logit distillation only: hidden-state distillation needs the model")
    need(c.distill.teacher_top_k is None, "distill.teacher_top_k",
         "selects from a full teacher; a cache is already the teacher's top-k (capture.top_k)")
  _check_on_policy(c, need)
  try:  # the data keys too, before a model is read: a misspelt value must not wait for a 7B teacher to load
    data_config.check(c.data)
  except data_config.DataError as e:
    raise ConfigError(f"config.{e}") from None
  need(c.data.batch_size >= 1, "data.batch_size", "must be >= 1 (rows per step, over all processes)")
  need(c.data.eval_batches is None or c.data.eval_batches >= 1, "data.eval_batches",
       "must be >= 1, or None for the whole held-out split")
  need(c.optimizer.schedule in optim.SCHEDULES, "optimizer.schedule", f"use one of {', '.join(optim.SCHEDULES)}")
  need(c.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
  need(0.0 <= c.optimizer.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio",
       "must be in [0, 1] (the final learning rate over optimizer.lr)")
  for key in ("optimizer.b1", "optimizer.b2"):
    need(0.0 <= _get(c, key) < 1.0, key, "must be in [0, 1) (Adam's moment decay)")
  need(c.distill.chunk_size >= 0, "distill.chunk_size", "must be >= 0 (0: from distill.chunk_budget_mib)")
  need(c.distill.chunk_budget_mib > 0, "distill.chunk_budget_mib", "must be > 0 (MiB a chunk may take on a device)")
  need(c.optimizer.micro_batches >= 1, "optimizer.micro_batches", "must be >= 1")
  need(c.data.batch_size % c.optimizer.micro_batches == 0, "data.batch_size",
       f"must be divisible by optimizer.micro_batches={c.optimizer.micro_batches}")
  need(c.optimizer.lr >= 0, "optimizer.lr", "must be >= 0")
  need(c.data.seq_len >= 2, "data.seq_len", "must be >= 2")
  need(bool(c.student.path), "student.path", "is empty; set it to an HF folder, a hub id or tiny:student")
  if step.loss_config(c).uses_teacher and not c.teacher.cache:
    need(bool(c.teacher.path), "teacher.path", "is empty but distillation needs a teacher "
         "(or set distill.alpha=0 and distill.hidden.weight=0 for plain SFT)")


def _check_lora(c, need) -> None:
  lo = c.student.lora
  need(isinstance(lo.rank, int) and lo.rank >= 0, "student.lora.rank",
       "must be an integer >= 0 (0: no LoRA, the whole student trains; 8 to 64 are usual)")
  if not lo.rank:
    need(not c.export.lora_adapter, "export.lora_adapter",
         "writes a LoRA student's adapters, but student.lora.rank is 0: set a rank, or export.lora_adapter=False")
    return
  need(lo.alpha > 0, "student.lora.alpha", "must be > 0 (the adapters' output is scaled by alpha / rank)")
  need(0.0 <= lo.dropout < 1.0, "student.lora.dropout", "must be in [0, 1) (0: no dropout)")
  try:
    lora_lib.parse_targets(lo.targets)
  except ValueError as e:
    need(False, "student.lora.targets", str(e))


def _check_on_policy(c, need) -> None:
  o = c.distill.on_policy
  need(0.0 <= o.fraction <= 1.0, "distill.on_policy.fraction", "must be in [0, 1] (the share of on-policy steps)")
  if not o.fraction:
    return
  need(c.distill.kind in losses.KD_KINDS and c.distill.alpha > 0, "distill.on_policy.fraction",
       "trains the student towards the teacher's distribution on sampled tokens: it needs logit distillation "
       f"(distill.kind one of {', '.join(losses.KD_KINDS)}, distill.alpha > 0)")
  need(not c.teacher.cache, "teacher.cache",
       "holds the teacher's log-probs on the dataset's tokens only; on-policy distillation scores tokens the "
       "student samples during training, so it needs the teacher model: set teacher.path and teacher.cache=\"\" "
       "(or distill.on_policy.fraction=0)")
  need(0 <= o.max_new_tokens < c.data.seq_len, "distill.on_policy.max_new_tokens",
       f"must be in [0, data.seq_len={c.data.seq_len}) (0: min(128, seq_len / 2)): a sampled row holds the "
       "prompt's last seq_len - max_new_tokens tokens and the completion")
  need(o.temperature >= 0, "distill.on_policy.temperature", "must be >= 0 (0 = greedy)")
  need(0.0 < o.top_p <= 1.0, "distill.on_policy.top_p", "must be in (0, 1] (1 = no nucleus cut)")
  need(o.top_k >= 0, "distill.on_policy.top_k", "must be >= 0 (0 = all tokens)")
  need(o.prompts_per_row >= 1, "distill.on_policy.prompts_per_row", "must be >= 1")
  need(o.start_step >= 0, "distill.on_policy.start_step", "must be >= 0 (steps before on-policy ones may come)")


def _get(c, dotted: str):
  for part in dotted.split("."):
    c = c[part]
  return c
