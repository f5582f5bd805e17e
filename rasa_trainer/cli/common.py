"""What the ``rasa-trainer`` subcommands share: model arguments and loading, and the checks that run before any
expensive work (every input file exists and parses, the output folder is writable, values are in range)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._errors import UsageError

SAFETY_WORLD = "safety_world"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
SAFETY_WORLD_CONFIG = CONFIGS_DIR / "safety_world.yaml"
DTYPE_NAMES = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "float32": "float32", "fp32": "float32"}
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
RISK_DIFFERENCE_RANGE = (-1.0, 1.0)


@dataclass
class ModelLoadArguments:
    """Which model to load and how (the model arguments of ``trl sft``'s ``ModelConfig`` that RASA honours).
    ``rasa-trainer train`` takes ``trust_remote_code`` from ``RASAConfig`` (an ``SFTConfig`` field)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local folder holding config.json (e.g. a checkpoint saved with save_pretrained), a Hub "
                          "model id, or 'safety_world' (the embedded demo model)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (as saved), bfloat16 (bf16), float16 (fp16) or float32 (fp32)."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation, e.g. sdpa, eager or flash_attention_2."}
    )


@dataclass
class ModelArguments(ModelLoadArguments):
    """``ModelLoadArguments`` plus ``trust_remote_code``, for the subcommands without a ``RASAConfig``."""

    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model repository's own Python code. Off by default: only enable it for code you "
                          "have read."},
    )


# ------------------------------------------------------------------------------------------------ checks


def torch_dtype(name: str):
    """``"auto"`` or the ``torch.dtype`` named by ``name`` (aliases bf16, fp16, fp32); a clear error otherwise."""
    import torch

    canonical = DTYPE_NAMES.get(str(name).strip().lower())
    if canonical is None:
        raise UsageError(f"--dtype {name!r} is not a dtype; use one of auto, bfloat16 (bf16), float16 (fp16), "
                         "float32 (fp32)")
    return canonical if canonical == "auto" else getattr(torch, canonical)


def looks_like_path(name: str) -> bool:
    """A string meant as a local path rather than a Hub id: it starts with ``/``, ``.`` or ``~``, has more than one
    ``/``, uses ``\\``, or its first component exists here."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).exists()


def check_model(name: str | None, flag: str = "--model_name_or_path") -> None:
    """A local model folder must exist and hold config.json; a Hub id is left to the Hub."""
    if not name:
        raise UsageError(f"{flag} is required: a local model folder or a Hub model id")
    if name == SAFETY_WORLD:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {name}: the folder has no config.json, so it is not a saved model; give the folder "
                             "written by save_pretrained (or by `rasa-trainer train`, its model/ subfolder)")
    elif path.exists():
        raise UsageError(f"{flag} {name} is a file; give the folder that holds config.json")
    elif looks_like_path(name):
        raise UsageError(f"{flag} {name}: no such folder ({path.resolve()}); give an existing model folder or a Hub id "
                         "such as allenai/OLMoE-1B-7B-0125-Instruct")


def check_output_dir(path: str | None, flag: str = "--output_dir") -> Path:
    """Create ``path`` and prove it writable with a probe file, before any model is loaded."""
    if not path:
        raise UsageError(f"{flag} is required: the folder to write results into")
    folder = Path(path).expanduser()
    probe = folder / f".rasa-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{flag} {path} is not a writable folder ({err.strerror or err}); choose a folder you can "
                         "write to") from err
    return folder


def check_at_least(flag: str, value: int | float | None, low: int | float) -> None:
    if value is not None and not value >= low:
        raise UsageError(f"{flag} {value}: must be at least {low}")


def check_threshold(flag: str, value: float) -> None:
    """A risk-difference threshold: experts are selected when RD > threshold, and RD lies in [-1, 1]."""
    low, high = RISK_DIFFERENCE_RANGE
    if not (math.isfinite(value) and low <= value < high):
        raise UsageError(f"{flag} {value}: risk differences lie in [{low:g}, {high:g}] and experts are selected when "
                         f"RD > threshold, so the threshold must be in [{low:g}, {high:g}) (0 keeps experts that fire "
                         "more often in successful jailbreaks than in refused plain requests)")


def check_fraction(flag: str, value: float, *, zero_allowed: bool = False) -> None:
    if not ((0.0 <= value if zero_allowed else 0.0 < value) and value <= 1.0):
        raise UsageError(f"{flag} {value}: must be in {'[0' if zero_allowed else '(0'}, 1]")


def check_num_experts(flag: str, value: float) -> None:
    if not value > 0 or (value >= 1 and value != int(value)):
        raise UsageError(f"{flag} {value}: give a fraction in (0, 1) of the routed experts or a whole count >= 1")


def check_judge(name: str | None, flag: str = "--judge", refusal_labels: list[str] | None = None,
                options: dict[str, Any] | None = None) -> None:
    """The judge ``name`` exists (a registered judge or a local checkpoint folder of a registered kind) and gets what
    it needs (a classifier its refusal labels, the HTTP judge its endpoint), before any model loads; see
    :func:`check_judges`."""
    check_judges([(flag, name)], refusal_labels, options)


def check_judges(judges: list[tuple[str, str | None]], refusal_labels: list[str] | None = None,
                 options: dict[str, Any] | None = None) -> None:
    """Every judge of a command, ``(flag, name)`` (None: the command's default judge), is checked by
    ``rasa_trainer.judges.check_judge_name`` (no model, no Hub lookup, no request); ``--judge_refusal_labels`` and
    every ``--judge_<option>`` given (``options``, from ``JudgeArguments.options()``) must reach a judge that takes
    it, never be ignored."""
    from ..judges import check_judge_name

    taken: set[str] = set()
    for flag, name in judges:
        if name is None:
            continue
        try:
            given = judge_options(name, refusal_labels, options)
            check_judge_name(name, **given)
        except ValueError as err:
            raise UsageError(f"{flag} {name}: {err}") from err
        taken.update(given)
    named = ", ".join(f"{flag} {name or 'default'}" for flag, name in judges)
    if refusal_labels and "refusal_labels" not in taken:
        raise UsageError(f"--judge_refusal_labels {' '.join(refusal_labels)}: only a classifier judge takes refusal "
                         f"labels, and no judge of this command is one ({named}); drop the option or give the folder "
                         "of a classifier checkpoint")
    ignored = sorted(set(options or {}) - taken)
    if ignored:
        raise UsageError(f"{', '.join('--judge_' + o for o in ignored)}: no judge of this command takes "
                         f"{'it' if len(ignored) == 1 else 'them'} ({named}); the HTTP judge (--judge openai) takes "
                         "--judge_base_url, --judge_model, --judge_format and its other options, --judge "
                         "qwen3guard:<folder> takes --judge_controversial")


JUDGE_CACHE_FILE = "judge_cache.json"


def with_judge_cache(options: dict[str, Any], judges: tuple[str | None, ...], output_dir: str | None) -> dict[str, Any]:
    """``options`` (the ``--judge_<option>`` values) with, when one of ``judges`` is the HTTP judge, its answers cached
    in ``output_dir``/judge_cache.json unless ``--judge_cache`` says where."""
    if "openai" in judges and "cache" not in options and output_dir:
        options["cache"] = os.path.join(output_dir, JUDGE_CACHE_FILE)
    return options


def judge_options(name: str, refusal_labels: list[str] | None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options the judge ``name`` gets: ``--judge_refusal_labels`` and the ``--judge_<option>`` values it takes."""
    from ..judges import judge_kind

    kind = judge_kind(name)
    given = {key: value for key, value in (options or {}).items() if kind.takes(key)}
    if refusal_labels and kind.takes("refusal_labels"):
        given["refusal_labels"] = list(refusal_labels)
    return given


def options_given(argv: list[str]) -> set[str]:
    """Names of the arguments set in ``argv`` or in its ``--config`` YAML file (``--a-b`` read as ``a_b``), to tell
    an option given from its default."""
    import yaml

    given = {arg[2:].partition("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if "--config" in argv[:-1]:
        path = Path(argv[argv.index("--config") + 1]).expanduser()
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            config = None  # the parser reports an unreadable config file
        if isinstance(config, dict):
            given |= {str(key) for key in config}
    return given


# ------------------------------------------------------------------------------------------------ inputs


def read_json(path: str, flag: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path} is not valid JSON: {err}") from err


def load_selection(path: str, flag: str = "--safety_critical_experts"):
    """A saved :class:`~rasa_trainer.detection.selection.SafetyCriticalExperts` (its JSON file or the folder holding it)."""
    from ..detection.selection import JSON_NAME, SafetyCriticalExperts

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / JSON_NAME
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file; run `rasa-trainer detect` first, or leave {flag} unset to "
                         "detect during training")
    try:
        return SafetyCriticalExperts.load(file)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{flag} {file}: {err}") from err


def load_pairs(name: str, *, anchor_column: str = "anchor_prompt", split: str = "train", config: str | None = None,
               max_pairs: int | None = None, flag: str = "--dataset_name"):
    """Pairs from a ``save_to_disk`` folder, a .json/.jsonl/.csv/.parquet file, a dataset folder or a Hub dataset,
    checked against the pair contract (``rasa_trainer.data.contract.validate_pairs``); errors name the file."""
    from ..data.contract import DatasetContractError, validate_pairs

    dataset = _read_dataset(name, split, config, flag)
    if max_pairs is not None:
        dataset = dataset.select(range(min(max_pairs, len(dataset))))
    try:
        validate_pairs(dataset, anchor_column=anchor_column)
    except DatasetContractError as err:
        raise UsageError(f"{flag} {name} does not follow the pair contract (see the README's dataset contract):\n"
                         f"{err}") from err
    return dataset


def _read_dataset(name: str, split: str, config: str | None, flag: str):
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            dataset = load_from_disk(str(path))
        elif path.is_file():
            if path.suffix not in DATA_FILE_BUILDERS:
                raise UsageError(f"{flag} {name}: unsupported file type {path.suffix!r}; use one of "
                                 f"{', '.join(DATA_FILE_BUILDERS)} or a folder written by Dataset.save_to_disk")
            dataset = load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() or not (looks_like_path(name) or path.suffix in DATA_FILE_BUILDERS):
            dataset = load_dataset(str(path) if path.is_dir() else name, config, split=split)
        else:
            raise UsageError(f"{flag} {name}: no such file or folder ({path.resolve()})")
    except UsageError:
        raise
    except Exception as err:  # datasets raises many types for unreadable data; name the file in every case
        raise UsageError(f"{flag} {name} could not be read as a dataset: {type(err).__name__}: {err}") from err
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UsageError(f"{flag} {name} has splits {sorted(dataset)}, not {split!r}; choose one with the split "
                             "argument")
        dataset = dataset[split]
    return dataset


@dataclass
class EvalSuite:
    """Evaluation sets with the judges that score them."""

    name: str
    sets: dict[str, list[dict[str, Any]]]
    judge: Any
    refusal_judge: Any
    utility_check: Callable[[str, str], bool] | None


def load_eval_sets(name: str, flag: str = "--eval_sets", world_seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """SafetyWorld's evaluation sets (``name == "safety_world"``) or a JSON file of sets, validated."""
    from ..data.contract import validate_eval_sets
    from ..evaluation.evaluate import _validated_sets

    if name == SAFETY_WORLD:
        from ..safety_world import make_world

        return make_world(seed=world_seed).eval_sets()
    sets = read_json(name, flag)
    try:  # every row by the pair contract's rules, and no empty set (set names are checked below)
        validate_eval_sets(sets, where=f"{flag} {name}")
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err
    try:
        _validated_sets(sets)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{flag} {name}: {err}") from err
    return sets


def build_judge(name: str | None, refusal_labels: list[str] | None = None, options: dict[str, Any] | None = None):
    """A registered judge ('keyword' when None, 'safety_world', 'openai', ...) or a local checkpoint judge, through
    ``rasa_trainer.judges.judge_from_name``; the refusal labels and options go to a judge that takes them."""
    from ..judges import judge_from_name

    name = name or "keyword"
    return judge_from_name(name, **judge_options(name, refusal_labels, options))


def eval_suite(name: str, sets: dict[str, list[dict[str, Any]]], judge: str | None,
               refusal_labels: list[str] | None = None, options: dict[str, Any] | None = None) -> EvalSuite:
    """The judges for ``sets``: SafetyWorld's exact judge and answer check for its own sets (or ``judge
    'safety_world'``), otherwise ``judge`` ('keyword' by default) with the keyword refusal judge for over-refusal."""
    from ..judges import RefusalKeywordJudge

    if judge == SAFETY_WORLD or (judge is None and name == SAFETY_WORLD):
        from ..safety_world import SafetyWorldJudge, utility_correct

        return EvalSuite(name, sets, SafetyWorldJudge(), SafetyWorldJudge(), utility_correct)
    return EvalSuite(name, sets, build_judge(judge, refusal_labels, options), RefusalKeywordJudge(), None)


# ------------------------------------------------------------------------------------------------ models


def model_location(name: str) -> str:
    """The folder or Hub id to load: the shipped SafetyWorld assets for ``safety_world``."""
    if name == SAFETY_WORLD:
        from ..safety_world import ASSETS_DIR

        return str(ASSETS_DIR)
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def _tokenizer_and_load_options(args: ModelLoadArguments, trust_remote_code: bool | None):
    """The model's location, the ``from_pretrained`` options (revision, ``trust_remote_code``: ``args``'s when None)
    and its tokenizer with a pad token (generation needs one; replies stop at EOS anyway)."""
    from transformers import AutoTokenizer

    if trust_remote_code is None:
        trust_remote_code = getattr(args, "trust_remote_code", False)
    location = model_location(args.model_name_or_path)
    load = {"revision": args.model_revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(location, **load)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return location, load, tokenizer


def load_model(args: ModelLoadArguments, device: Any = None, trust_remote_code: bool | None = None):
    """``(model, tokenizer)`` from ``args`` in eval mode, on ``device`` when given; a pad token is set if missing.
    ``trust_remote_code`` defaults to ``args.trust_remote_code`` (False when ``args`` has none)."""
    from transformers import AutoModelForCausalLM

    location, load, tokenizer = _tokenizer_and_load_options(args, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype(args.dtype),
                                                 attn_implementation=args.attn_implementation, **load)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_model_skeleton(args: ModelLoadArguments, trust_remote_code: bool | None = None):
    """``(model, tokenizer)`` as :func:`load_model` gives them, but the model an empty skeleton on the ``meta`` device
    (its layout, dtype and generation config; no weights read): for the vLLM backend, which loads the weights
    itself."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    location, load, tokenizer = _tokenizer_and_load_options(args, trust_remote_code)
    config = AutoConfig.from_pretrained(location, **load)
    dtype = torch_dtype(args.dtype)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    try:  # the stop ids generation uses, as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(location, revision=args.model_revision)
    except OSError:
        pass  # no generation_config.json: from_config derived one from the config, as from_pretrained does
    return model.eval(), tokenizer


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ parsing


def split_equals(argv: list[str], flags: tuple[str, ...] = ("--config",)) -> list[str]:
    """``--config=x`` as ``--config x`` (``TrlParser`` finds the config file by the separate flag)."""
    out: list[str] = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out += [flag, value] if eq and flag in flags else [arg]
    return out


def parse(dataclass_types: tuple[type, ...], argv: list[str] | None, prog: str):
    """Parse ``argv`` (``sys.argv[1:]`` when None) with ``trl.TrlParser``: YAML ``--config`` then command-line
    overrides; an unknown key in the YAML file is a :class:`UsageError`."""
    from trl import TrlParser

    argv = split_equals(list(sys.argv[1:] if argv is None else argv))
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if config is not None and not Path(config).expanduser().is_file():
        raise UsageError(f"--config {config}: no such file")
    parser = TrlParser(dataclass_types, prog=prog)
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as err:  # e.g. an unknown key in the YAML file, or a value the dataclass rejects
        raise UsageError(str(err)) from err
