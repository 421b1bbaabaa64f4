"""Every documented command composes, and the README's library snippet runs.

The commands are taken from README.md and docs/*.md: every `python train.py|sample.py|evaluate.py|convert.py ...`
in a code block or in inline code (line continuations, `&&` chains, leading environment assignments, `srun` /
`torchrun` launchers, `-m` / `--multirun`). Each is composed with Hydra's compose API against its entry script's
config, with its overrides, so a renamed key or group fails here and not in a reader's terminal. Placeholders in
values (`<run>`, `PATH`, `...`) are plain strings to compose; nothing is run.
"""

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_CONFIGS = {"train.py": "train", "sample.py": "sample", "evaluate.py": "evaluate", "convert.py": "convert"}

# `python train.py`, `python3 convert.py`, `torchrun --nproc_per_node=4 train.py`
_ENTRY = re.compile(r"(?:\bpython3?\s+|\btorchrun\s+(?:--?\S+\s+)*)(train|sample|evaluate|convert)\.py\b")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_PLACEHOLDER = re.compile(r"<[^<>]*>")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SHELL_OPERATORS = ("&&", "||", ";", "|")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    script: str  # train.py, sample.py, evaluate.py or convert.py
    args: tuple[str, ...]  # what follows the script, flags included
    text: str

    @property
    def multirun(self) -> bool:
        return "-m" in self.args or "--multirun" in self.args

    @property
    def overrides(self) -> list[str]:
        """The Hydra overrides, placeholders replaced by a plain string, flags and bare `...` left out."""
        out = []
        for arg in self.args:
            if arg.startswith("-") or arg in ("...", "…"):
                continue
            key, sep, value = arg.partition("=")
            out.append(key + sep + _PLACEHOLDER.sub("PLACEHOLDER", value) if sep else arg)
        return out

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced code block's lines, joined at a trailing `\\`, and of every inline
    code span (which may wrap over lines) outside the fenced blocks."""
    out = []
    for block in _FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        joined, start = "", None
        for i, line in enumerate(block.group(1).split("\n")):
            start = first_line + i if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            out.append((start, joined + line))
            joined, start = "", None
    prose = _FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)
    for span in _INLINE.finditer(prose):
        out.append((prose.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " ")))
    return sorted(out, key=lambda snippet: snippet[0])  # page order; spans on one line keep theirs


def _is_launched(before: list[str]) -> bool:
    """Whether the tokens before an entry script start it: `[ENV=x] [srun] python`, or `torchrun [flags]`."""
    words = [t for t in before if not _ENV.match(t)]
    return bool(words) and (Path(words[-1]).name.startswith("python") or any(Path(t).name == "torchrun" for t in words))


def extract_commands(text: str, page: str = "<page>") -> list[Command]:
    """Every documented invocation of an entry script in a Markdown text, in page order."""
    commands = []
    for line, snippet in _snippets(text):
        if not _ENTRY.search(snippet):
            continue
        try:
            tokens = shlex.split(snippet, comments=True)
        except ValueError:  # an unbalanced quote: take the snippet as it is
            tokens = snippet.split()
        chain = [[]]
        for token in tokens:
            if token in _SHELL_OPERATORS:
                chain.append([])
            else:
                chain[-1].append(token)
        for part in chain:
            for i, token in enumerate(part):
                if Path(token).name in ENTRY_CONFIGS and _is_launched(part[:i]):
                    commands.append(Command(page, line, Path(token).name, tuple(part[i + 1 :]), " ".join(part)))
                    break
    return commands


def _sweep_values(override) -> list[str]:
    """The values a multirun sweep visits (an interval: its two ends)."""
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return list(override.sweep_string_iterator())
    raise AssertionError(f"unknown sweep {override.input_line!r}")


def override_sets(command: Command) -> list[list[str]]:
    """The override lists to compose: one, or for a multirun one per value of each sweep (the others at their
    first value). A sweep without -m is what Hydra refuses at run time, so it stays a sweep and fails to compose."""
    overrides = command.overrides
    if not command.multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {i: _sweep_values(o) for i, o in enumerate(parsed) if o.is_sweep_override()}

    def pick(choice: dict[int, str]) -> list[str]:
        return [
            f"{parsed[i].get_key_element()}={choice.get(i, sweeps[i][0])}" if i in sweeps else override
            for i, override in enumerate(overrides)
        ]

    sets = [pick({})]
    for i, values in sweeps.items():
        sets += [pick({i: value}) for value in values[1:]]
    return sets


def compose_command(command: Command) -> None:
    """Compose (and resolve, outside the hydra node) every override set of the command; raises on a bad key."""
    importlib.import_module("src.builders")  # registers the config's resolvers, as the entry scripts' imports do
    for overrides in override_sets(command):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(ENTRY_CONFIGS[command.script], overrides=overrides, return_hydra_config=True)
        finally:
            GlobalHydra.instance().clear()
        HydraConfig.instance().set_config(cfg)  # what ${hydra:...} reads, as in a run
        with open_dict(cfg):
            del cfg.hydra  # the hydra node itself (${now:...}, the launcher's keys) is Hydra's to resolve
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def _documented_commands() -> list[Command]:
    return [c for page in PAGES for c in extract_commands(page.read_text(), str(page.relative_to(REPO)))]


DOCUMENTED = _documented_commands()
_PLUGIN_OF = {"hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher"}
_PLUGIN_OF_PREFIX = {"hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper"}


@pytest.mark.parametrize("command", DOCUMENTED, ids=[f"{c.page}:{c.line}" for c in DOCUMENTED])
def test_documented_command_composes(command):
    for arg in command.args:  # launcher / sweeper plugins are optional (requirements-cluster.txt)
        module = _PLUGIN_OF.get(arg) or next((m for p, m in _PLUGIN_OF_PREFIX.items() if arg.startswith(p)), None)
        if module:
            pytest.importorskip(module, reason=f"{arg} needs its Hydra plugin: pip install -r requirements-cluster.txt")
    try:
        compose_command(command)
    except Exception as error:  # the message names the page and line to fix
        raise AssertionError(f"{command}\n  does not compose: {type(error).__name__}: {error}") from error


def test_every_entry_script_and_the_quickstart_are_documented():
    scripts = {c.script for c in DOCUMENTED}
    assert scripts == set(ENTRY_CONFIGS), f"no documented command for {set(ENTRY_CONFIGS) - scripts}"
    readme = [c for c in DOCUMENTED if c.page == "README.md"]
    assert any(c.script == "train.py" and not c.args for c in readme), "the README has no plain `python train.py`"
    for script in ("sample.py", "evaluate.py", "convert.py"):
        assert any(c.script == script for c in readme), f"the README shows no {script} command"


PAGE = """\
Train:

```bash
WANDB_MODE=offline python train.py logger=wandb \\
    schedule=cosine   # a comment
python train.py -m schedule=linear,cosine objective=simple,hybrid && python sample.py ckpt_path=<run>/last.ckpt
srun python train.py trainer.num_nodes=$SLURM_NNODES
torchrun --nnodes=2 --nproc_per_node=4 train.py trainer=ddp
python -m pytest -m "not slow"
python benchmarks/throughput.py --threads 1
```

Then `python evaluate.py ckpt_path=PATH "seeds=[0,1,2]"` or `HYDRA_FULL_ERROR=1 python convert.py format=openai
src=a.pt dst=b.ckpt`; `python train.py ... resume=true` continues.
"""


def test_the_extractor_finds_every_form_of_a_command():
    found = [(c.script, c.args) for c in extract_commands(PAGE)]
    assert found == [
        ("train.py", ("logger=wandb", "schedule=cosine")),
        ("train.py", ("-m", "schedule=linear,cosine", "objective=simple,hybrid")),
        ("sample.py", ("ckpt_path=<run>/last.ckpt",)),
        ("train.py", ("trainer.num_nodes=$SLURM_NNODES",)),
        ("train.py", ("trainer=ddp",)),
        ("evaluate.py", ("ckpt_path=PATH", "seeds=[0,1,2]")),
        ("convert.py", ("format=openai", "src=a.pt", "dst=b.ckpt")),
        ("train.py", ("...", "resume=true")),
    ]
    multirun = extract_commands(PAGE)[1]
    assert override_sets(multirun) == [
        ["schedule=linear", "objective=simple"],
        ["schedule=cosine", "objective=simple"],
        ["schedule=linear", "objective=hybrid"],
    ]
    for command in extract_commands(PAGE):
        compose_command(command)


@pytest.mark.parametrize(
    "line",
    [
        "python train.py schedule.num_timestep=100",  # a misspelt key
        "python train.py schedul=cosine",  # a misspelt group
        "python train.py objective=simpel",  # an option the group does not have
        "python evaluate.py ckpt_path=PATH num_sample=500",
        "python train.py schedule=linear,cosine",  # a sweep without -m, which Hydra refuses at run time
    ],
)
def test_a_wrong_key_in_a_page_fails_to_compose(line):
    (command,) = extract_commands(f"Run:\n\n```bash\n{line}\n```\n")
    with pytest.raises((ConfigCompositionException, MissingConfigException)):
        compose_command(command)


def library_snippet(readme: str) -> str:
    """The first ```python block of the README's "Library use" section."""
    section = re.search(r"^## Library use\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, 'README.md has no "## Library use" section'
    code = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert code, 'the "Library use" section has no ```python block'
    return code.group(1)


@pytest.mark.usefixtures("single_thread")  # a tiny net: a second thread only stalls on a shared 2-core machine
def test_the_readme_library_snippet_runs():
    code = library_snippet((REPO / "README.md").read_text())
    exec(compile(code, "README.md (Library use)", "exec"), {"__name__": "readme_snippet"})
