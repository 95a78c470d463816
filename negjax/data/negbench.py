"""Readers for the official NegBench CSV files, and video frame sampling.

The task is decided by the full column set: `captions` + a path column -> retrieval;
`caption_0..caption_{k}` + `image_path` + `correct_answer` + `correct_answer_template`
-> MCQ; exactly `caption_0`, `caption_1` without a template column -> binary MCQ
(CheXpert). Anything in between (e.g. 4 options and no template column) is an error
naming the missing column, never a guess. A path with a video extension makes it the
video variant. Files are UTF-8 (a BOM is fine). Every malformed row stops reading with
an error naming the file and line, because a silently dropped question changes the metric.
"""
import ast
import csv
import dataclasses
import io
import os
import re

import numpy as np

from negjax import metrics

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
PATH_COLUMNS = ("image_path", "filepath", "video_path", "video", "path")
FRAMES_PER_VIDEO = 4


class NegBenchFormatError(ValueError):
  """A CSV that is not a well-formed NegBench file."""


@dataclasses.dataclass
class McqSet:
  kind: str  # "mcq", "video_mcq" or "binary_mcq"
  file: str
  paths: list  # media path per question (resolved)
  options: list  # list[list[str]], [questions][options]
  answer: np.ndarray  # int32 [N]
  question_type: np.ndarray  # int32 [N], ids into metrics.TYPE_NAMES
  option_types: np.ndarray  # int32 [N, O]; metrics.UNKNOWN where the file does not say
  lines: list  # CSV line of each question, for messages


@dataclasses.dataclass
class RetrievalSet:
  kind: str  # "retrieval" or "video_retrieval"
  file: str
  paths: list  # media path per item (resolved)
  captions: list  # list[list[str]], several per item
  lines: list


def is_video(path):
  return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def detect_kind(header, file="CSV"):
  """'mcq', 'binary_mcq', 'retrieval', or None when no NegBench column is there (not a
  NegBench file). A header with some NegBench columns but not a complete set raises,
  naming what is missing. The video variants are decided later from the paths."""
  columns = set(header)
  if "captions" in columns:
    if not any(c in columns for c in PATH_COLUMNS):
      raise NegBenchFormatError(f"{file}: a retrieval file (it has `captions`) needs a media "
                                f"path column: one of {', '.join(PATH_COLUMNS)}")
    return "retrieval"
  if not any(c.startswith("caption_") for c in columns) and "correct_answer" not in columns:
    return None
  n = _num_options(header)
  missing = [c for c in ("image_path", "caption_0", "caption_1", "correct_answer")
             if c not in columns]
  if missing:
    raise NegBenchFormatError(f"{file}: an MCQ file needs column(s) {', '.join(missing)}")
  extra = sorted(c for c in columns if re.fullmatch(r"caption_\d+", c)
                 and int(c.split("_")[1]) >= n)
  if extra:
    raise NegBenchFormatError(f"{file}: has {extra[0]} but no caption_{n} (options must be "
                              "caption_0, caption_1, ... without gaps)")
  if "correct_answer_template" in columns:
    return "mcq"
  if n == 2:
    return "binary_mcq"
  raise NegBenchFormatError(f"{file}: {n} options (caption_0..caption_{n - 1}) but no "
                            "correct_answer_template column; only a 2-option file without it "
                            "is a binary MCQ")


def _num_options(header):
  n = 0
  while f"caption_{n}" in header:
    n += 1
  return n


def _decode(file, raw=None):
  """The text of a UTF-8 CSV (a leading BOM is dropped); other encodings are refused with
  the line of the first bad byte, since a guessed encoding would change captions."""
  if raw is None:
    try:
      with open(file, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise NegBenchFormatError(f"{file}: cannot read: {e}") from e
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise NegBenchFormatError(
        f"{file}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
        "save the file as UTF-8") from None


def _header(path):
  with open(path, "rb") as f:
    first = f.readline(1 << 20)
  try:
    return next(csv.reader([_decode(path, first)]), None)
  except csv.Error as e:
    raise NegBenchFormatError(f"{path}:1: malformed CSV header: {e}") from e


def find_files(data_root):
  """Every CSV under `data_root` whose header makes it a NegBench file, sorted. A CSV that
  cannot be decoded or has an incomplete NegBench header raises rather than being left out."""
  found = []
  for folder, _, names in os.walk(data_root):
    for name in names:
      if name.lower().endswith(".csv"):
        path = os.path.join(folder, name)
        if detect_kind(_header(path) or [], path):
          found.append(path)
  return sorted(found)


def _resolve(path, root):
  path = os.path.expanduser(path.strip())
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def _parse_captions(cell, where):
  """A Python list literal of strings, parsed as a literal: never evaluated."""
  try:
    value = ast.literal_eval(cell)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    raise NegBenchFormatError(f"{where}: captions cell is not a Python list literal "
                              f"({type(e).__name__}): {cell[:80]!r}") from None
  if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
    raise NegBenchFormatError(f"{where}: captions must be a non-empty list of strings, "
                              f"got {cell[:80]!r}")
  return value


def _template_id(value, where, column):
  value = value.strip()
  if value not in metrics.TEMPLATES:
    raise NegBenchFormatError(f"{where}: unknown template {value!r} in {column} "
                              f"(expected one of {', '.join(metrics.TEMPLATES)})")
  return metrics.TEMPLATES.index(value)


def read(file, data_root=None):
  """Reads one NegBench CSV. Relative media paths are joined to `data_root` (default: the
  CSV's own folder). Returns a McqSet or RetrievalSet."""
  root = data_root if data_root is not None else os.path.dirname(os.path.abspath(file))
  reader = csv.reader(io.StringIO(_decode(file), newline=""))
  try:
    header = next(reader, None)
    if not header:
      raise NegBenchFormatError(f"{file}: empty file (no header row)")
    kind = detect_kind(header, file)
    if kind is None:
      raise NegBenchFormatError(f"{file}: columns {header} are not a NegBench MCQ or "
                                "retrieval file")
    rows = []
    for row in reader:
      if not row:  # a blank line
        continue
      where = f"{file}:{reader.line_num}"
      if len(row) != len(header):
        raise NegBenchFormatError(f"{where}: {len(row)} columns, header has {len(header)}")
      rows.append((where, reader.line_num, dict(zip(header, row))))
  except csv.Error as e:
    raise NegBenchFormatError(f"{file}:{reader.line_num}: malformed CSV: {e}") from e
  if not rows:
    raise NegBenchFormatError(f"{file}: empty file (a header but no rows)")
  if kind == "retrieval":
    return _retrieval(file, header, rows, root)
  return _mcq(file, header, rows, root, kind)


def _retrieval(file, header, rows, root):
  column = next(c for c in PATH_COLUMNS if c in header)
  paths = [_resolve(r[column], root) for _, _, r in rows]
  captions = [_parse_captions(r["captions"], where) for where, _, r in rows]
  kind = "video_retrieval" if any(is_video(p) for p in paths) else "retrieval"
  return RetrievalSet(kind, file, paths, captions, [line for _, line, _ in rows])


def _mcq(file, header, rows, root, kind):
  n_options = _num_options(header)
  type_columns = [f"caption_{i}_type" for i in range(n_options)]
  typed = [c in header for c in type_columns]
  if any(typed) and not all(typed):
    raise NegBenchFormatError(f"{file}: option type columns are incomplete: missing "
                              f"{', '.join(c for c, t in zip(type_columns, typed) if not t)}")
  typed = all(typed)
  paths, options, answer, qtype, otypes = [], [], [], [], []
  for where, _, r in rows:
    try:
      a = int(r["correct_answer"])
    except ValueError:
      raise NegBenchFormatError(f"{where}: correct_answer {r['correct_answer']!r} is not an "
                                "integer") from None
    if not 0 <= a < n_options:
      raise NegBenchFormatError(f"{where}: correct_answer {a} out of range for {n_options} "
                                "options")
    paths.append(_resolve(r["image_path"], root))
    options.append([r[f"caption_{i}"] for i in range(n_options)])
    answer.append(a)
    if kind == "mcq":
      qtype.append(_template_id(r["correct_answer_template"], where, "correct_answer_template"))
    else:
      qtype.append(metrics.UNKNOWN)
    if typed:
      otypes.append([_template_id(r[f"caption_{i}_type"], where, f"caption_{i}_type")
                     for i in range(n_options)])
    else:  # official files: option types are not recorded; reported as unknown
      otypes.append([metrics.UNKNOWN] * n_options)
  if kind == "mcq" and any(is_video(p) for p in paths):
    kind = "video_mcq"
  return McqSet(kind, file, paths, options, np.asarray(answer, np.int32),
                np.asarray(qtype, np.int32), np.asarray(otypes, np.int32).reshape(-1, n_options),
                [line for _, line, _ in rows])


def frame_indices(count, num_frames=FRAMES_PER_VIDEO):
  """Which frames of a `count`-frame clip the official code embeds: min(num_frames, count)
  of them, at the midpoints of equal intervals of [0, count - 1], computed as it does:
  interval edges from torch's linspace cast to int (truncated), midpoints rounded half to
  even. 31 -> [4, 11, 18, 26]; 4 -> [0, 0, 2, 2]; 2 -> [0, 0]. Repeats are kept: they
  weigh in the mean."""
  k = min(num_frames, count)
  i = np.arange(k + 1)
  step = (count - 1) / k
  # torch's linspace: the first half counts up from the start, the rest down from the end
  edges = np.where(i < (k + 1) // 2, step * i, (count - 1) - step * (k - i)).astype(np.int64)
  return np.round((edges[:-1] + edges[1:]) / 2).astype(np.int64)


def video_frames(path, num_frames=FRAMES_PER_VIDEO):
  """The frames of a video file that the official code embeds, RGB uint8 [H, W, 3] at
  `frame_indices(count)`, where count is the number of packets of the video stream (what
  decord, the official reader, counts; container metadata may be missing or wrong).

  Decodes once from the start and stops after the last wanted frame. A clip that decodes
  to fewer frames than it has packets, or that is stored rotated, is refused with an
  error naming the file (the official reader would give other pixels; we never guess).
  """
  import av
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError(f"{path}: no video stream")
    count = sum(1 for packet in container.demux(video=0) if packet.size)
  if not count:
    raise ValueError(f"{path}: video has no frames")
  wanted = frame_indices(count, num_frames)
  wanted_set, last = set(wanted.tolist()), int(wanted[-1])
  frames, decoded = {}, 0
  with av.open(path) as container:
    for i, frame in enumerate(container.decode(video=0)):
      decoded = i + 1
      if i in wanted_set:
        if frame.rotation:
          raise ValueError(f"{path}: video is stored rotated ({frame.rotation} degrees); "
                           "rotated videos are not supported")
        frames[i] = frame.to_ndarray(format="rgb24")
      if i == last:
        break
  if last not in frames:
    raise ValueError(f"{path}: video has {count} packets but only {decoded} frames decode; "
                     f"frame {last} is needed")
  return [frames[i] for i in wanted]
