"""`python -m negjax.compile --config configs/negclip.py:paper --topology v5e:16x16`: will the
training step fit, and how fast could it be, on a TPU slice or GPU node this host does not have?

Ahead-of-time compiles the exact step `negjax.train` runs (its mesh rule, state shardings,
dtype, remat, scan and loss: `train.make_mesh`, `train_step.state_shardings`,
`train_step.make_train_step`) and the evaluator's two encoders, for compile-only devices, on
this CPU host, with abstract shapes (no weights, no data). Texts are compiled at the full
`data.text_length` (the trainer's `trim_text` usually cuts them shorter: this is the worst
case). Prints per device: argument / output / temporary / peak memory against the chip's HBM,
FLOPs per step (XLA's count where the compiler gives one; `negjax.flops` always), and the
step time at the chip's peak and at --mfu.

  pip install -e '.[tpu]'    # libtpu: the TPU compiler (~20 s)
  python -m negjax.compile --config configs/negclip.py:paper --topology v5e:16x16 \\
      --config.model.arch=ViT-B-16 --config.model.dtype=bfloat16 --config.mesh.fsdp=-1 \\
      --config.mesh.data=1 --config.batch_size=4096 --json /tmp/fit.json

Topology names are libtpu's `gen:XxY[xZ]`: v5e:16x16 = v5e-256, v5p:4x4x4 = v5p-128 (64
chips), v6e:16x16 = v6e-256, v4:4x4x4 = v4-128. GPUs (`pip install -e '.[gpu]'`, then
`JAX_PLATFORMS=cpu`): `--gpu h200 --gpus 8 --gpu_target_config h200.txtpb`, a
GpuTargetConfigProto text the installed jaxlib's XLA parses (see `gpu_devices` for where to
get one); Triton GEMMs are turned off (deviceless, XLA cannot autotune them); the GPU
compiler gives memory but no FLOP count. A program that does not fit a TPU's HBM fails to
compile: that is reported as `fits: false` with the compiler's figure.
"""
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from negjax import atomic, cli, flops, retention, sharding, train, train_step
from negjax.models import clip, layers, siglip

GiB = 1 << 30


# Per chip: HBM, dense bf16 peak FLOP/s, host vCPUs per chip of the usual host. Public
# figures (Cloud TPU system architecture pages; NVIDIA H100/H200 datasheets, dense bf16;
# hosts: ct5lp-hightpu-4t 112 vCPU / 4 chips, ct5p 208 / 4, ct6e-standard-4t 180 / 4,
# v4 240 / 4, a3-highgpu-8g 208 / 8, a3-ultragpu-8g 224 / 8).
CHIPS = {
    "v4": dict(hbm_bytes=32 * GiB, peak_flops=275e12, host_cores_per_chip=60),
    "v5e": dict(hbm_bytes=16 * GiB, peak_flops=197e12, host_cores_per_chip=28),
    "v5p": dict(hbm_bytes=95 * GiB, peak_flops=459e12, host_cores_per_chip=52),
    "v6e": dict(hbm_bytes=32 * GiB, peak_flops=918e12, host_cores_per_chip=45),
    "h100": dict(hbm_bytes=80 * 10 ** 9, peak_flops=989e12, host_cores_per_chip=26),
    "h200": dict(hbm_bytes=141 * 10 ** 9, peak_flops=989e12, host_cores_per_chip=28),
}
MCQ_OPTIONS = 4  # NegBench's MCQs (and the data engine's) have four options

_CONFIG = train._CONFIG  # the trainer's --config flag (and its --config.x=y overrides)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, libtpu's name, e.g. v5e:16x16")
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice)")
_GPU = flags.DEFINE_enum("gpu", None, ["h100", "h200"], "compile for NVIDIA GPUs instead")
_GPUS = flags.DEFINE_integer("gpus", 8, "GPUs per node (with --gpu)")
_NODES = flags.DEFINE_integer("nodes", 1, "GPU nodes (with --gpu)")
_GPU_SPEC = flags.DEFINE_string("gpu_target_config", None, "GpuTargetConfigProto text file")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation for the predicted step time")
_ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "xla"],
                               "auto: the platform's fused attention; xla: materialised")
_EVAL = flags.DEFINE_bool("eval", True, "also compile the evaluator's encoders")
_JSON = flags.DEFINE_string("json", None, "write the figures as one JSON object here")


def tpu_devices(topology: str, num_slices: int = 1):
  """Compile-only devices of a TPU slice (libtpu, no TPU needed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise cli.UserError("compiling for TPU needs libtpu: pip install -e '.[tpu]'") from None
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles at once
  from jax.experimental import topologies
  options = {"num_slices": num_slices} if num_slices > 1 else {}
  if topology.startswith("v4:"):
    options["chip_config_name"] = "megacore"  # one device per chip, as Cloud TPU VMs run
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        **options).devices
  except Exception as e:  # libtpu's message names what it did not accept
    raise cli.UserError(f"--topology {topology!r}: {str(e).splitlines()[0]} (names look "
                        f"like v5e:16x16, v5p:4x4x4, v6e:16x16)") from None


GPU_SPEC_HELP = (
    "a GpuTargetConfigProto text for the GPU, from either (1) a machine with that GPU and "
    "this jaxlib: python -c 'import jax; from jax._src.lib import xla_client as xc; "
    "print(xc.get_topology_for_devices(jax.devices()).target_config)' > h200.txtpb, or "
    "(2) XLA's xla/backends/gpu/target_config/specs/h200.txtpb at the XLA commit jaxlib "
    "{version} was built from (XLA_COMMIT in jax's third_party/xla/revision.bzl at tag "
    "jax-v{version}); files from XLA's main branch can name fields this XLA does not know: "
    "delete the lines the parse error names")


def gpu_devices(spec_path: str, gpus: int, nodes: int = 1):
  """Compile-only NVIDIA devices from a GpuTargetConfigProto text (JAX_PLATFORMS=cpu). The
  text must parse for the installed jaxlib's XLA (GPU_SPEC_HELP says where to get one)."""
  help_ = GPU_SPEC_HELP.format(version=jax.__version__)
  if not spec_path or not os.path.exists(spec_path):
    raise cli.UserError(f"--gpu needs --gpu_target_config FILE, {help_}; got {spec_path!r}")
  if os.environ.get("JAX_PLATFORMS") != "cpu":
    raise cli.UserError("--gpu: run with JAX_PLATFORMS=cpu (else the CUDA plugin looks for "
                        "a GPU and does not register its compile-only topology)")
  from jax.experimental import topologies
  with open(spec_path) as f:
    spec = f.read()
  try:
    return topologies.get_topology_desc("aot", "cuda", target_config=spec,
                                        topology=f"1x{nodes}x{gpus}").devices
  except Exception as e:
    if "Failed to parse GpuTargetConfigProto" in str(e):  # XLA logged the line and field
      raise cli.UserError(f"{spec_path}: not a GpuTargetConfigProto this jaxlib parses (the "
                          f"log line above names the field); use {help_}") from None
    raise cli.UserError(f"GPU compile-only devices: {str(e).splitlines()[0]} (pip install -e "
                        f"'.[gpu]' for the CUDA plugin)") from None


def chip_of(devices, topology=None) -> str:
  """The CHIPS entry: the topology's generation (v5p:4x4x4 -> v5p), else the device kind."""
  generation = (topology or "").split(":")[0]
  if generation in CHIPS:
    return generation
  kind = devices[0].device_kind.lower()  # "TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU v4"
  for chip, pattern in (("v5e", "v5 lite"), ("v6e", "v6 lite"), ("v5p", "v5"), ("v4", "v4")):
    if pattern in kind:
      return chip
  raise cli.UserError(f"no HBM/peak figures for device kind {devices[0].device_kind!r}")


def architecture(model_config) -> str:
  """The architecture the trainer would build: model.arch, else the one named by init."""
  if model_config.arch:
    return model_config.arch
  if model_config.init.startswith("openai:"):
    return model_config.init.split(":", 1)[1]
  if model_config.init == "shapes":
    return "negjax-shapes"
  raise cli.UserError("set --config.model.arch: the architecture of model.init "
                      f"{model_config.init!r} is not known without reading the file")


def abstract_model(config):
  """The model the trainer builds, as shapes only (no memory for weights)."""
  if config.model.arch in siglip.ARCHITECTURES or siglip.is_siglip(config.model.init):
    raise cli.UserError("negjax.compile builds CLIP training steps only: SigLIP's abstract "
                        "model, full-length text batch and FLOP count are not written here "
                        "(negjax.train fine-tunes SigLIP folders)")
  arch = architecture(config.model)
  try:
    cfg = clip.get_config(arch, **train.model_options(config.model))
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  return nnx.eval_shape(lambda: clip.CLIP(cfg, nnx.Rngs(0)))


def two_streams(config) -> bool:
  """Caption rows and MCQ rows of other images (data.source other than "records", as the
  official NegFull training reads its CSVs): a step then sees 2 x batch_size images."""
  return config.data.get("source", "records") != "records" and config.loss.mcq_weight > 0


def abstract_batch(config, image_size):
  """One global batch as train_input makes it, texts at the full configured length."""
  b, n = config.batch_size, config.data.text_length
  sds = jax.ShapeDtypeStruct
  image = sds((b, image_size, image_size, 3), jnp.uint8)
  batch = {"image": image, "caption_ids": sds((b, n), jnp.int32),
           "mcq_ids": sds((b, MCQ_OPTIONS, n), jnp.int32), "mcq_answer": sds((b,), jnp.int32)}
  if two_streams(config):
    batch["mcq_image"] = image
  if retention.distills(config.loss):  # a caption per row for distillation
    batch["retain_ids"] = sds((b, n), jnp.int32)
  return batch


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes)}
  # total: everything at once, the conservative figure; peak: the compiler's live maximum
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  out["peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0)) or out["total_bytes"]
  return out


def _out_of_memory(error) -> dict | None:
  """The TPU compiler's 'does not fit' error -> the figure it names, else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", text)
  required = None
  if found:
    required = int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
  return {"fits": False, "temp_bytes": required,
          "error": text.strip().splitlines()[0][:300]}


def compile_step(config, devices, chip: str, topology: str, mfu: float = 0.4) -> dict:
  """Compiles the training step for `devices`; returns the figures (per device unless
  named otherwise). A TPU program over HBM comes back with fits False."""
  model = abstract_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, schedule = train_step.make_optimizer(config.optim, config.total_steps)
  mesh = train.make_mesh(config, devices)
  shardings = train_step.state_shardings(params, tx, mesh)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  batch = abstract_batch(config, model.config.image_size)
  extra = {"initial": params} if retention.needs_initial(config.loss) else {}  # anchor/teacher
  step = train_step.make_train_step(graphdef, tx, schedule, config.loss, mesh, shardings,
                                    **extra)
  n = len(devices)
  lengths = [config.data.text_length] * (1 + (MCQ_OPTIONS if config.loss.mcq_weight else 0))
  per_image = flops.train_flops_per_image(model.config, lengths)
  if two_streams(config):
    per_image += 3 * flops.image_forward_flops(model.config)
  analytic = per_image * config.batch_size
  spec = CHIPS[chip]
  out = {"topology": topology, "chip": chip, "devices": n, "mesh": dict(mesh.shape),
         "arch": architecture(config.model), "batch_size": config.batch_size,
         "per_device_batch": config.batch_size / sharding.batch_shards(mesh),
         "dtype": config.model.dtype, "remat": config.model.remat,
         "scan_layers": config.model.scan_layers, "text_length": config.data.text_length,
         "images_per_step": config.batch_size * (2 if two_streams(config) else 1),
         "hbm_bytes": spec["hbm_bytes"], "flops_per_step": analytic,
         "flops_source": "negjax.flops (matmuls; global)", "mfu": mfu,
         "step_time_at_peak_s": analytic / (n * spec["peak_flops"]),
         "step_time_at_mfu_s": analytic / (n * spec["peak_flops"] * mfu)}
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = step.lower(state, batch).compile()
  except NotImplementedError as e:  # a fused attention kernel refused these shapes
    raise cli.UserError(f"the step does not trace: {str(e).splitlines()[0]} (the trainer "
                        f"would fail the same way on this platform; --attention xla "
                        f"compiles XLA's attention instead)") from None
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is an answer
    oom = _out_of_memory(e)
    if oom is None:
      raise
    out.update(oom, compile_s=time.perf_counter() - t0)
    return out
  out["compile_s"] = time.perf_counter() - t0
  out.update(memory(compiled))
  out["fits"] = out["peak_bytes"] <= spec["hbm_bytes"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  out["compiler_flops_per_device"] = float(cost["flops"]) if cost and "flops" in cost else None
  return out


def compile_encoders(config, devices) -> dict:
  """The evaluator's jitted towers (`evaluate.Encoders`), on one device as it runs them, at
  its batch size."""
  from negjax import evaluate
  model = abstract_model(config)
  enc = evaluate.Encoders(model)
  on_device = jax.sharding.SingleDeviceSharding(devices[0])
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)
  state = jax.tree.map(place, enc.state)
  b, size = config.eval.batch_size, model.config.image_size
  images = place(jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32))
  ids = place(jax.ShapeDtypeStruct((b, model.config.context_length), jnp.int32))
  out = {}
  one_device = sharding.make_mesh(1, 1, devices[:1])  # traced for the target's platform
  for name, fn, x in (("image", evaluate._encode_image, images),
                      ("text", evaluate._encode_text, ids)):
    try:
      with jax.set_mesh(one_device):
        out[name] = memory(fn.lower(enc.graphdef, state, x).compile())
    except Exception as e:  # noqa: BLE001
      oom = _out_of_memory(e)
      if oom is None:
        raise
      out[name] = oom
  return out


def report(r: dict) -> str:
  g = lambda k: f"{r[k] / GiB:7.2f} GiB" if r.get(k) is not None else "      n/a"
  lines = [f"{r['arch']} on {r['topology']} ({r['devices']} x {r['chip']}), mesh {r['mesh']}, "
           f"global batch {r['batch_size']} ({r['per_device_batch']:g} per device), "
           f"{r['dtype']}, remat {r['remat']}, scan {r['scan_layers']}"]
  if "error" in r:
    lines.append(f"  does NOT fit: {r['error']}")
  else:
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "peak_bytes"):
      lines.append(f"  {key[:-6]:9s} {g(key)} per device")
    lines.append(f"  HBM       {g('hbm_bytes')}: {'fits' if r['fits'] else 'does NOT fit'} "
                 f"(compiled in {r['compile_s']:.0f} s)")
  lines.append(f"  FLOPs/step {r['flops_per_step']:.3e} (negjax.flops, global)")
  if r.get("compiler_flops_per_device") is not None:
    note = " (a scanned layer stack counts once)" if r["scan_layers"] else ""
    lines.append(f"  XLA FLOPs {r['compiler_flops_per_device'] * r['devices']:.3e} "
                 f"(per device x devices){note}")
  lines.append(f"  step time {r['step_time_at_peak_s'] * 1e3:.1f} ms at peak, "
               f"{r['step_time_at_mfu_s'] * 1e3:.1f} ms at {r['mfu']:.0%} MFU")
  for name, m in r.get("evaluator", {}).items():
    lines.append(f"  evaluator {name} tower (batch {r['eval_batch_size']}, one device): "
                 + (f"peak {m['peak_bytes'] / GiB:.2f} GiB" if "peak_bytes" in m
                    else f"does NOT fit: {m['error']}"))
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise cli.UserError("--config is required, e.g. configs/negclip.py:paper")
  if bool(_TOPOLOGY.value) == bool(_GPU.value):
    raise cli.UserError("give one of --topology (TPU) or --gpu h100|h200")
  if _GPU.value:
    # compile-only, XLA:GPU picks Triton GEMM tiles without autotuning and some do not
    # compile ("Couldn't find output tile sizes"): cuBLAS GEMMs unless the user chose
    if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + " --xla_gpu_enable_triton_gemm=false").strip()
    devices = gpu_devices(_GPU_SPEC.value, _GPUS.value, _NODES.value)
    chip, topology = _GPU.value, f"{_NODES.value}x{_GPUS.value} {_GPU.value}"
  else:
    devices = tpu_devices(_TOPOLOGY.value, _SLICES.value)
    chip, topology = chip_of(devices, _TOPOLOGY.value), _TOPOLOGY.value
  with layers.use_attention(_ATTENTION.value):
    result = compile_step(config, devices, chip, topology, _MFU.value)
    result["attention"] = _ATTENTION.value
    if _EVAL.value:
      result["eval_batch_size"] = config.eval.batch_size
      result["evaluator"] = compile_encoders(config, devices)
  print(report(result))
  if _JSON.value:
    atomic.write_json(_JSON.value, result)


if __name__ == "__main__":
  cli.run(main)
