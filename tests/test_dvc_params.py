"""dvc.yaml's params: every ``params.yaml`` key a stage's code reads is declared under that stage's ``params:``.

DVC re-runs a stage when a declared dep changes, and a params key counts only when the stage lists it. A key
the code reads but dvc.yaml does not list lets ``dvc exp run -S <key>=...`` leave the stage "up to date"
with outputs made from the old value (issue #19 item 6: the train-split stages read ``dataset.*`` while
declaring only their own section; ``seg_eval`` declared nothing).

The reference is the stage's own source, read with ``ast``: the module named by the stage's ``cmd``
(``python -m pipeline.<stage>``) and the shared ``pipeline`` helpers it imports (``pipeline._stage``), not
other stages' modules. In them every attribute chain rooted at the name ``params`` (``params.dataset.
train_split``), or at a name assigned from such a chain in the same function (``cfg = params.weakclip``;
``cfg.train.lr`` reads ``weakclip.train.lr``), is a read; a chain used whole (``to_plain(params.pseudo)``,
``launch_stage(..., params.runtime)``) reads every key under it. Whole ``params`` handed to an imported
function is a read nobody can see, and fails the test. In the shared runner, a read under ``if
spec.global_batches ...`` counts only for the stages whose ``StageSpec`` names ``global_batches`` (the ones it
may relaunch under torchrun as ``runtime`` says). A declared entry covers itself and every key under it
(``dataset`` covers ``dataset.train_split``).
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = "params.yaml"

# Config properties computed from YAML keys: DVC tracks the keys, so a read of the property needs them.
DERIVED = {
    # weakclip_core/config/dataset.py: DatasetConfig.scored_split is `score_split or train_split`
    "dataset.scored_split": ("dataset.score_split", "dataset.train_split"),
}

# Reads that cannot change what a stage writes, each with its reason: {(stage, chain): reason}. An exact
# chain only (a stage's other reads under the same section still count).
NOT_OUTPUT_SHAPING: dict[tuple[str, str], str] = {}

# Sections a stage hands whole to a function that drops some of their keys: {(stage, section): (dropped keys,
# reason)}. Such a read is covered when the declared entries cover every other key of the section (params.yaml's).
DROPPED_SUBKEYS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("seg_train", "seg"): (("eval",), "seg.eval is seg_eval's protocol; seg_train hands the section to "
                                      "build_segmenter, training_config and segmenter_record "
                                      "(weakclip_core/models/segmenter.py), which read model, encoder, "
                                      "encoder_weights and train only"),
    **{(stage, "runtime"): (("precision",), "the shared runner hands runtime to launch_stage (pipeline/_stage.py: "
                                            "check_batches_divide, check_gpus_for_torchrun, relaunch_under_torchrun "
                                            "read launcher, nproc and device); runtime.precision is WeakCLIP's "
                                            "autocast, read by weakclip_train and pseudo_masks alone")
       for stage in ("clip", "cam_train", "seg_train")},
}


@dataclass(frozen=True)
class Read:
    """One params read: the dotted key path (``""`` = all of params), where it is, and, in a shared helper,
    whether it happens only for stages that may run under torchrun (``True``), only for the others
    (``False``) or for both (``None``)."""

    key: str
    where: str
    distributed_only: bool | None = None


def global_batches_branch(test: ast.expr) -> bool | None:
    """For ``if spec.global_batches is None`` → ``False`` (the body runs for single-process stages);
    ``is not None`` or a bare ``spec.global_batches`` → ``True``; any other test → ``None``."""
    if isinstance(test, ast.Attribute) and test.attr == "global_batches":
        return True
    if isinstance(test, ast.Compare) and isinstance(test.left, ast.Attribute) and \
            test.left.attr == "global_batches" and len(test.ops) == 1 and \
            isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value is None:
        return isinstance(test.ops[0], ast.IsNot) if isinstance(test.ops[0], (ast.Is, ast.IsNot)) else None
    return None


def dotted(node: ast.AST) -> tuple[str, list[str]] | None:
    """``a.b.c`` → ``("a", ["b", "c"])``; ``None`` unless the node is a pure attribute chain on a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node.id, parts[::-1]
    return None


def imported_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


class ParamsReads(ast.NodeVisitor):
    """The params reads of one module (see the module docstring for what counts)."""

    def __init__(self, tree: ast.Module, label: str) -> None:
        self.label = label
        self.imported = imported_names(tree)
        self.reads: list[Read] = []
        self.branch: list[bool | None] = [None]
        self.scopes: list[dict[str, tuple[str, ...]]] = [{"params": ()}]
        self.parents: dict[ast.AST, ast.AST] = {child: parent for parent in ast.walk(tree)
                                                for child in ast.iter_child_nodes(parent)}
        self.visit(tree)

    # -- aliases: `cfg = params.clip`, `arch, train = params.cam.arch, params.cam.train`
    def resolve(self, node: ast.AST | None, innermost: dict | None = None) -> tuple[str, ...] | None:
        chain = dotted(node) if node is not None else None
        if chain is None:
            return None
        root, attributes = chain
        for scope in [innermost or {}, *reversed(self.scopes)]:
            if root in scope:
                return None if scope[root] is None else (*scope[root], *attributes)
        return None

    def aliases_of(self, body: list[ast.stmt]) -> dict[str, tuple[str, ...]]:
        """Names assigned in ``body`` (this scope, not nested functions) from params chains; ``None`` shadows."""
        found: dict[str, tuple[str, ...] | None] = {}

        def bind(target: ast.AST, value: ast.AST | None) -> None:
            if isinstance(target, ast.Name):
                if target.id == "params":  # the name params is always the params
                    return
                chain = self.resolve(value, found)
                if chain is None or found.get(target.id, chain) != chain:
                    found[target.id] = None  # assigned something else too: not an alias here
                else:
                    found[target.id] = chain
            elif isinstance(target, (ast.Tuple, ast.List)):
                values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and \
                    len(value.elts) == len(target.elts) else [None] * len(target.elts)
                for element, element_value in zip(target.elts, values):
                    bind(element, element_value)

        def walk(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                    continue
                if isinstance(child, ast.Assign):
                    for target in child.targets:
                        bind(target, child.value)
                elif isinstance(child, (ast.AnnAssign, ast.AugAssign)):
                    bind(child.target, getattr(child, "value", None) if isinstance(child, ast.AnnAssign) else None)
                elif isinstance(child, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith, ast.NamedExpr)):
                    targets = ([child.target] if isinstance(child, (ast.For, ast.AsyncFor, ast.NamedExpr))
                               else [item.optional_vars for item in child.items if item.optional_vars])
                    for target in targets:
                        bind(target, child.value if isinstance(child, ast.NamedExpr) else None)
                walk(child)

        holder = ast.Module(body=body, type_ignores=[])
        walk(holder)
        return found  # type: ignore[return-value]

    def visit_scope(self, node: ast.AST, body: list[ast.stmt], arguments: ast.arguments | None) -> None:
        scope: dict[str, tuple[str, ...] | None] = {}
        if arguments is not None:  # a parameter shadows an outer alias, except a parameter named params
            for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                             *([arguments.vararg] if arguments.vararg else []),
                             *([arguments.kwarg] if arguments.kwarg else [])):
                scope[argument.arg] = () if argument.arg == "params" else None
        self.scopes.append(scope)
        scope.update(self.aliases_of(body))
        for child in body if isinstance(body, list) else [body]:
            self.visit(child)
        self.scopes.pop()

    def visit_Module(self, node: ast.Module) -> None:
        self.scopes[0].update(self.aliases_of(node.body))
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        for default in (*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)):
            self.visit(default)
        self.visit_scope(node, node.body, node.args)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit_scope(node, [ast.Expr(node.body)], node.args)

    def visit_Assign(self, node: ast.Assign) -> None:
        """``cfg = params.clip`` reads nothing by itself: the uses of ``cfg`` are the reads."""
        pairs: list[tuple[ast.AST, ast.AST]] = []
        for target in node.targets:
            if isinstance(target, ast.Name):
                pairs.append((target, node.value))
            elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(node.value, (ast.Tuple, ast.List)) \
                    and len(target.elts) == len(node.value.elts):
                pairs += list(zip(target.elts, node.value.elts))
        aliased = {id(value) for target, value in pairs
                   if isinstance(target, ast.Name) and target.id != "params" and self.resolve(value) is not None}
        if id(node.value) in aliased:
            return
        for target in node.targets:
            self.visit(target)
        values = node.value.elts if isinstance(node.value, (ast.Tuple, ast.List)) else [node.value]
        for value in values:
            if id(value) not in aliased:
                self.visit(value)

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        branch = global_batches_branch(node.test)
        for body, taken in ((node.body, branch), (node.orelse, None if branch is None else not branch)):
            self.branch.append(taken if taken is not None else self.branch[-1])
            for child in body:
                self.visit(child)
            self.branch.pop()

    # -- reads
    def record(self, chain: tuple[str, ...], node: ast.AST, note: str = "") -> None:
        key = ".".join(chain)
        for derived, sources in DERIVED.items():
            if key == derived or key.startswith(derived + "."):
                for source in sources:
                    self.reads.append(Read(source, f"{self.label}:{node.lineno} ({key})", self.branch[-1]))
                return
        self.reads.append(Read(key, f"{self.label}:{node.lineno}{note}", self.branch[-1]))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = self.resolve(node)
        if chain is None:
            self.generic_visit(node)
            return
        parent = self.parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node and chain:  # params.x.get(...): a method of x
            chain = chain[:-1]
        if not isinstance(node.ctx, ast.Load):
            return
        self.record(chain, node)

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            return
        chain = self.resolve(node)
        if chain is None:
            return
        if chain == ():  # the whole params: fine when handed to this code's own functions (read here too)
            parent = self.parents.get(node)
            if isinstance(parent, ast.Call) and node in parent.args + [kw.value for kw in parent.keywords]:
                callee = dotted(parent.func)
                if callee is not None and callee[0] in self.imported:
                    self.record((), node, f" (whole params passed to {'.'.join([callee[0], *callee[1]])})")
            return
        self.record(chain, node)


def module_file(dotted_name: str) -> Path:
    relative = dotted_name.replace(".", "/")
    path = REPO_ROOT / f"{relative}.py"
    return path if path.is_file() else REPO_ROOT / relative / "__init__.py"


def stage_modules(module: str, stage_modules_all: set[str]) -> list[Path]:
    """The stage's module and the ``pipeline`` helpers it imports that are not themselves stages."""
    path = module_file(module)
    found = [path]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] == "pipeline" and name not in stage_modules_all and name != "pipeline" \
                    and module_file(name).is_file() and module_file(name) not in found:
                found.append(module_file(name))
    return found


def may_run_under_torchrun(tree: ast.Module) -> bool:
    """Whether the stage's ``StageSpec(...)`` (pipeline/_stage.py) names ``global_batches``: then the shared
    runner relaunches it under torchrun as ``runtime`` says and opens its DDP context."""
    for node in ast.walk(tree):
        callee = dotted(node.func) if isinstance(node, ast.Call) else None
        if callee is not None and [callee[0], *callee[1]][-1] == "StageSpec":
            for keyword in node.keywords:
                if keyword.arg == "global_batches" and not (isinstance(keyword.value, ast.Constant)
                                                           and keyword.value.value is None):
                    return True
    return False


def reads_of(module: str, stage_modules_all: set[str]) -> list[Read]:
    """The stage module's reads, and those of the shared helpers it imports that apply to it."""
    paths = stage_modules(module, stage_modules_all)
    trees = [ast.parse(path.read_text(), filename=str(path)) for path in paths]
    distributed = may_run_under_torchrun(trees[0])
    reads = []
    for index, (path, tree) in enumerate(zip(paths, trees)):
        found = ParamsReads(tree, str(path.relative_to(REPO_ROOT))).reads
        reads += [read for read in found
                  if index == 0 or read.distributed_only is None or read.distributed_only == distributed]
    return reads


def declared_params(body: dict) -> list[str]:
    keys = []
    for entry in body.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        else:
            for file, names in entry.items():
                assert file == PARAMS_FILE, f"params from {file}: this test reads only {PARAMS_FILE}"
                keys += list(names)
    return keys


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def stages_of(dvc_yaml_text: str) -> dict[str, tuple[str, list[str]]]:
    """``{stage: (module, declared params)}`` from dvc.yaml's ``cmd`` and ``params``."""
    rows = {}
    for name, stage in yaml.safe_load(dvc_yaml_text)["stages"].items():
        body = stage.get("do", stage)
        rows[name] = (body["cmd"].split("-m ", 1)[1].split()[0], declared_params(body))
    return rows


def section_keys(section: str) -> list[str]:
    """The dotted keys one level under ``section`` in the typed schema (``weakclip_core.config.Params``): a key
    the schema has but params.yaml leaves at its default is still a key DVC must track."""
    from weakclip_core.config import Params  # noqa: PLC0415 (only this helper needs the schema)

    node: type = Params
    for part in section.split("."):
        node = typing.get_type_hints(node)[part]
    return [f"{section}.{field.name}" for field in dataclasses.fields(node)]


def covered(stage: str, key: str, declared: list[str]) -> bool:
    """Whether a declared entry covers the read ``key``, or, for a section in ``DROPPED_SUBKEYS``, every key
    of it but the dropped ones."""
    if any(covers(entry, key) for entry in declared):
        return True
    if (stage, key) not in DROPPED_SUBKEYS:
        return False
    dropped = {f"{key}.{sub}" for sub in DROPPED_SUBKEYS[(stage, key)][0]}
    return all(any(covers(entry, sub) for entry in declared) for sub in section_keys(key) if sub not in dropped)


def undeclared_reads(dvc_yaml_text: str) -> dict[str, list[Read]]:
    """``{stage: reads no declared params entry covers}`` for every stage with any."""
    stages = stages_of(dvc_yaml_text)
    all_modules = {module for module, _ in stages.values()}
    missing = {}
    for name, (module, declared) in stages.items():
        gaps = [read for read in reads_of(module, all_modules)
                if (name, read.key) not in NOT_OUTPUT_SHAPING and not covered(name, read.key, declared)]
        if gaps:
            missing[name] = gaps
    return missing


def unread_declarations(dvc_yaml_text: str) -> dict[str, list[str]]:
    """``{stage: declared entries that no read reaches}``: a stale entry re-runs a stage for nothing."""
    stages = stages_of(dvc_yaml_text)
    all_modules = {module for module, _ in stages.values()}
    unread = {}
    for name, (module, declared) in stages.items():
        keys = {read.key for read in reads_of(module, all_modules)}
        stale = [entry for entry in declared if not any(covers(entry, key) or covers(key, entry) for key in keys)]
        if stale:
            unread[name] = stale
    return unread


def parse(source: str) -> list[str]:
    return sorted({read.key for read in ParamsReads(ast.parse(source), "x").reads})


def test_reads_are_found_through_aliases_helpers_and_derived_properties() -> None:
    source = '''
import helpers
from weakclip_core.config import to_plain

def run(params):
    cfg, train = params.weakclip, params.weakclip.train
    dataset = params.dataset
    helper(params)
    x = train.lr + cfg.seeds.fg_threshold
    to_plain(params.pseudo)
    launch(params.runtime, dataset.train_split)
    return dataset.scored_split, params.cam.infer.scales.index(1.0)

def helper(params):
    return params.seg.model

def other(dataset):
    dataset = Dataset(dataset)
    return dataset.name, cfg.x

def closure(params):
    arch = params.cam.arch
    def inner():
        return arch.width
    return inner
'''
    assert parse(source) == ["cam.arch.width", "cam.infer.scales", "dataset.score_split", "dataset.train_split",
                             "pseudo", "runtime", "seg.model", "weakclip.seeds.fg_threshold", "weakclip.train.lr"]
    whole = ParamsReads(ast.parse("import helpers\ndef f(params):\n    helpers.go(params)\n"), "x").reads
    assert [read.key for read in whole] == [""] and "helpers.go" in whole[0].where


def test_coverage_against_known_answers() -> None:
    assert covers("dataset", "dataset.train_split")
    assert covers("dataset.train_split", "dataset.train_split")
    assert not covers("dataset.train", "dataset.train_split")
    assert not covers("dataset.train_split", "dataset")
    assert not covers("dataset.train_split", "")


def test_every_params_key_a_stage_reads_is_declared() -> None:
    missing = undeclared_reads((REPO_ROOT / "dvc.yaml").read_text())
    assert not missing, "dvc.yaml: stages read params they do not declare:\n" + "\n".join(
        f"  {stage}: {read.key or '(all of params)'} at {read.where}" for stage, reads in missing.items()
        for read in reads)


def test_every_exemption_still_applies() -> None:
    """An exemption whose read is gone must go too, or it would hide a later real read of the same key."""
    stages = stages_of((REPO_ROOT / "dvc.yaml").read_text())
    modules = {module for module, _ in stages.values()}
    stale = [(stage, key) for stage, key in NOT_OUTPUT_SHAPING
             if key not in {read.key for read in reads_of(stages[stage][0], modules)}]
    assert not stale, f"NOT_OUTPUT_SHAPING: {stale} no longer read; remove them"


def test_a_section_handed_whole_needs_every_key_but_the_dropped_ones() -> None:
    """Known answers: seg_train's whole-``seg`` read is covered by its four entries, not by three of them, and
    a stage not in the table gets no such allowance."""
    everything_but_eval = ["seg.model", "seg.encoder", "seg.encoder_weights", "seg.train"]
    assert sorted(section_keys("seg")) == sorted([*everything_but_eval, "seg.eval"])
    assert covered("seg_train", "seg", everything_but_eval)
    assert not covered("seg_train", "seg", everything_but_eval[:3])
    assert not covered("seg_eval", "seg", everything_but_eval)
    assert covered("seg_eval", "seg", ["seg"])


def test_every_declared_params_entry_is_read() -> None:
    assert unread_declarations((REPO_ROOT / "dvc.yaml").read_text()) == {}


# dvc.yaml's params before issue #19 item 6 (at 570e963): the train-split stages declared only their own
# section, seg_eval nothing; prepare and summary declared `dataset` whole.
PARAMS_BEFORE_ISSUE_19 = {
    "prepare": ["dataset"], "clip": ["clip", "runtime"], "cam_train": ["cam.arch", "cam.train", "runtime"],
    "cam_infer": ["cam.infer", "runtime"], "weakclip_train": ["weakclip", "runtime"],
    "pseudo_masks": ["pseudo", "runtime"], "seg_train": ["seg", "runtime"], "seg_eval": [], "summary": ["dataset"],
}


def with_params(dvc_yaml_text: str, params: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's ``params:`` replaced (an empty list removes the section)."""
    document = yaml.safe_load(dvc_yaml_text)
    for name, stage in document["stages"].items():
        body = stage.get("do", stage)
        body.pop("params", None)
        if params[name]:
            body["params"] = params[name]
    return yaml.safe_dump(document, sort_keys=False)


def test_the_params_before_the_fix_are_refused_for_the_stages_the_issue_names() -> None:
    before = with_params((REPO_ROOT / "dvc.yaml").read_text(), PARAMS_BEFORE_ISSUE_19)
    missing = undeclared_reads(before)
    assert set(missing) == {"weakclip_train", "clip", "cam_train", "cam_infer", "pseudo_masks", "seg_train",
                            "seg_eval"}
    for stage, reads in missing.items():  # each of them reads dataset keys it did not declare
        assert any(read.key.startswith("dataset.") for read in reads), stage
    assert {"dataset.prepared_dir", "dataset.val_split", "runtime.device"} <= {read.key for read in missing["seg_eval"]}
    assert "dataset.score_split" in {read.key for read in missing["cam_infer"]}  # through dataset.scored_split


@pytest.mark.parametrize("stage", sorted(stages_of((REPO_ROOT / "dvc.yaml").read_text())))
def test_each_stage_module_is_read(stage: str) -> None:
    module, _ = stages_of((REPO_ROOT / "dvc.yaml").read_text())[stage]
    assert module_file(module).is_file(), f"{stage}: {module} not found"
