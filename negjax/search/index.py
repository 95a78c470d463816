"""A search index: one L2-normalised image embedding per file of a folder, in one .npz file.

The file holds `features` (float32 [N, D]) and `meta` (JSON): the folder, each file's
relative path, size, mtime and SHA-256, the files that could not be read (with why), the
checkpoint (name, path, bytes, SHA-256) and the model's architecture name. Images are read,
preprocessed and encoded by the evaluator's own functions (`negjax.evaluate.encode_media`:
Grain input, batches, progress bar), so indexing costs what evaluation costs. Rebuilding
into an existing index re-encodes only new or changed files: a file whose size and mtime
are unchanged is kept; one whose size or mtime changed is kept if its SHA-256 is the same;
files gone from the folder are dropped. The index is replaced in one rename.
"""
import concurrent.futures
import dataclasses
import datetime
import hashlib
import io
import json
import os
import sys

import numpy as np

from negjax import atomic, cli, provenance

FORMAT = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def checkpoint_path(checkpoint):
  """The file behind a checkpoint name: "shapes" is the shapes-CLIP inside negjax,
  "openai:ARCH" the cached official file; anything else is a path."""
  from negjax.models import weights
  if checkpoint == "shapes":
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                        "shapes_clip.safetensors")
  return os.path.abspath(weights.resolve(checkpoint))


def checkpoint_record(checkpoint):
  """{"name", "path", "bytes", "sha256"} of a checkpoint, by content."""
  path = checkpoint_path(checkpoint)
  if not os.path.exists(path):
    raise cli.UserError(f"checkpoint {checkpoint}: no such file or folder: {path}")
  return dict(provenance.file_record(path), name=str(checkpoint))


@dataclasses.dataclass
class Index:
  folder: str  # absolute
  files: list  # [{"path" (relative to folder), "bytes", "mtime_ns", "sha256"}], row order
  features: np.ndarray  # float32 [N, D], L2-normalised
  checkpoint: dict  # checkpoint_record
  model: str  # architecture name
  image_size: int
  skipped: list = dataclasses.field(default_factory=list)  # [{"path", "error"}]
  created: str = ""

  @property
  def paths(self):
    return [f["path"] for f in self.files]

  def save(self, out):
    meta = {k: v for k, v in dataclasses.asdict(self).items() if k != "features"}
    meta.update(format=FORMAT, negjax_version=provenance.version())
    buffer = io.BytesIO()
    np.savez(buffer, features=self.features.astype(np.float32), meta=np.array(json.dumps(meta)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic.write(out, lambda f: f.write(buffer.getvalue()), binary=True)

  def same_checkpoint(self, record, what="the checkpoint given"):
    """Refuses `record` (checkpoint_record) unless it has this index's content."""
    if record["sha256"] != self.checkpoint["sha256"]:
      raise cli.UserError(
          f"the index was made with {self.checkpoint['name']} ({self.checkpoint['path']}, "
          f"sha256 {self.checkpoint['sha256'][:12]}), not with {what}, {record['name']} "
          f"({record['path']}, sha256 {record['sha256'][:12]}); index again with it, or "
          "give the index's checkpoint")


def content_hash(path):
  """SHA-256 of a file's bytes (not through provenance's small cache: an index hashes many
  files, which would push the checkpoint's hash out of it)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def load(path):
  """Reads an index written by `Index.save`; errors name the file."""
  if not os.path.exists(path):
    raise cli.UserError(f"index {path}: no such file (make it with `python -m negjax.search "
                        "index`)")
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      features = np.asarray(z["features"], np.float32)
  except (OSError, ValueError, KeyError) as e:
    raise cli.UserError(f"index {path}: not a negjax search index ({e})") from e
  if meta.get("format") != FORMAT:
    raise cli.UserError(f"index {path}: format {meta.get('format')}, this negjax reads "
                        f"{FORMAT}; index again")
  fields = {f.name for f in dataclasses.fields(Index)} - {"features"}
  return Index(features=features, **{k: meta[k] for k in fields if k in meta})


def scan(folder):
  """Image files under `folder` (by extension), relative and sorted, and the links that
  lead outside it (never indexed, so never served)."""
  root = os.path.realpath(folder)
  found, outside = [], []
  for parent, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(names):
      if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      full = os.path.join(parent, name)
      rel = os.path.relpath(full, folder)
      if os.path.islink(full) and os.path.commonpath([root, os.path.realpath(full)]) != root:
        outside.append({"path": rel, "error": "a link to a file outside the folder"})
      else:
        found.append(rel)
  return found, outside


def build(images, checkpoint, out, batch_size=64, workers=0, arch=None, model=None,
          encoders=None, progress=True, log=print):
  """Indexes every image under `images` into `out` (updating an index already there) and
  returns the Index. `model` (and its `evaluate.Encoders`, compiled once for several
  calls): the loaded checkpoint, when the caller has it already."""
  from negjax import evaluate
  from negjax.models import clip, weights
  folder = os.path.abspath(images)
  if not os.path.isdir(folder):
    raise cli.UserError(f"--images {images}: no such folder")
  record = checkpoint_record(checkpoint)
  found, skipped = scan(folder)
  if not found:
    raise cli.UserError(f"--images {images}: no image files in it ({', '.join(IMAGE_EXTENSIONS)})")
  old = load(out) if os.path.exists(out) else None
  if old is not None:
    old.same_checkpoint(record, "the --checkpoint given")
    if old.folder != folder:
      raise cli.UserError(f"{out} indexes {old.folder}, not {folder}; give another --out")
  previous = {f["path"]: (f, row) for row, f in enumerate(old.files)} if old else {}
  kept, kept_rows, todo = [], [], []
  for rel in found:
    full = os.path.join(folder, rel)
    st = os.stat(full)
    entry = {"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    before, row = previous.get(rel, (None, None))
    if before and (before["bytes"], before["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
      kept.append(before)
      kept_rows.append(row)
      continue
    if before:
      entry["sha256"] = content_hash(full)
      if entry["sha256"] == before["sha256"]:  # touched, same content
        kept.append(entry)
        kept_rows.append(row)
        continue
    todo.append(entry)
  dropped = len(set(previous) - set(found))

  if model is None and todo:
    model = weights.load_model(record["path"], arch=arch)
  if encoders is None and todo:
    encoders = evaluate.Encoders(model)
  if old is not None:
    name = old.model
  else:
    name = arch or clip.architecture_name(model.config) or "custom"
  features = old.features[kept_rows] if old else np.zeros((0, 0), np.float32)
  new = []
  if todo:
    unhashed = [e for e in todo if "sha256" not in e]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # hashing overlaps encoding
      hashes = pool.map(content_hash, [os.path.join(folder, e["path"]) for e in unhashed])
      feats, ok, bad = evaluate.encode_media(
          encoders, [os.path.join(folder, e["path"]) for e in todo], batch_size, 1, workers,
          desc="indexing" if progress else None)
      for e, digest in zip(unhashed, hashes):
        e["sha256"] = digest
    feats = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
    if not np.isfinite(feats[ok]).all():
      raise cli.UserError(f"{checkpoint}: the model gave non-finite (NaN/Inf) features")
    new = [e for e, good in zip(todo, ok) if good]
    features = feats[ok] if not len(features) else np.concatenate([features, feats[ok]])
    skipped += [{"path": os.path.relpath(b["path"], folder), "error": b["error"]} for b in bad]
  files = kept + new
  if not files:
    raise cli.UserError(f"--images {images}: none of its {len(found)} image files can be read "
                        f"(first: {skipped[0]['path']}: {skipped[0]['error']})")
  order = np.argsort([f["path"] for f in files], kind="stable")
  index = Index(folder=folder, files=[files[i] for i in order], features=features[order],
                checkpoint=record, model=name,
                image_size=encoders.image_size if encoders else old.image_size,
                skipped=sorted(skipped, key=lambda s: s["path"]),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))
  index.save(out)
  log(f"{out}: {len(files)} images ({len(new)} encoded, {len(kept)} kept, {dropped} dropped), "
      f"{len(index.skipped)} unreadable, model {name}")
  for s in index.skipped:
    print(f"  unreadable: {s['path']}: {s['error']}", file=sys.stderr)
  return index
