"""The ``conceptedit`` command line (typer + rich). Every command has a Python equivalent.

User errors (a bad recipe, a missing model...) print a readable message and exit with code 2,
never a traceback; ``--json`` commands print machine-readable output on stdout only.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
import yaml
from rich.console import Console
from rich.table import Table

from conceptedit.cli.third_party import (
    VERBOSE_ENV,
    drop_harmless_notices,
    show_third_party_progress,
    verbose_requested,
)
from conceptedit.errors import ConceptEditError, RecipeError
from conceptedit.plugins import PluginHost, get_host

drop_harmless_notices()

app = typer.Typer(
    name="conceptedit",
    help="Erase concepts from text-to-image diffusion models with plugin-based edit recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
_plugin_dirs: list[Path] = []


def user_errors(func: F) -> F:
    """Turn conceptedit's own errors into a message and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            err.print(
                f"[bold red]error:[/] {len(exc.issues)} problem(s) in recipe {_escape(exc.source or '<recipe>')}",
                soft_wrap=True,
            )
            for issue in exc.issues:
                err.print("  " + _escape(issue.render(exc.source)), soft_wrap=True)
            raise typer.Exit(2) from None
        except ConceptEditError as exc:
            err.print(f"[bold red]error:[/] {_escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def host() -> PluginHost:
    plugin_host = get_host()
    for folder in _plugin_dirs:
        plugin_host.load_path(folder)
    return plugin_host


@app.callback()
def main_options(
    plugins_dir: Annotated[
        list[Path] | None, typer.Option("--plugins-dir", help="Also load plugins from .py files in this folder.")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help=f"Also show other libraries' progress bars and notices (or set {VERBOSE_ENV}=1)."
        ),
    ] = False,
) -> None:
    _plugin_dirs[:] = plugins_dir or []
    show_third_party_progress(verbose or verbose_requested())


# --------------------------------------------------------------------------- plugins / methods


@app.command()
@user_errors
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List loaded plugins: where each came from, its version, what it provides, and load errors."""
    h = host()
    rows = sorted(h.infos.values(), key=lambda i: (i.source != "core", i.name))
    conflicts = h.registry.conflicts
    if as_json:
        print(json.dumps({"plugins": [vars(i) for i in rows], "conflicts": conflicts}, indent=2))
        return
    table = Table(title="conceptedit plugins")
    for col in ("name", "from", "version", "provides", "status"):
        table.add_column(col)
    for info in rows:
        origin = info.source if info.source == "core" else f"{info.source}: {info.distribution or info.location}"
        status = f"[red]failed: {_escape(info.error)}[/]" if info.error else "[green]loaded[/]"
        table.add_row(info.name, origin, info.version or "", ", ".join(info.provides), status)
    out.print(table)
    for conflict in conflicts:
        err.print(f"[yellow]warning:[/] {conflict}")


@app.command()
@user_errors
def methods(
    name: Annotated[str | None, typer.Argument(help="Show one method in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List edit methods with kind, backbones and every parameter (type, default, description)."""
    from conceptedit.recipe.describe import describe_method

    h = host()
    registry = h.registry.methods
    chosen = [h.method(name)] if name else [registry[n] for n in sorted(registry)]
    described = [describe_method(cls) | {"plugin": h.registry.method_origin[cls.name]} for cls in chosen]
    if as_json:
        print(json.dumps(described, indent=2, default=str))
        return
    if not described:
        out.print("No edit methods installed. Install a plugin, or see `conceptedit plugins` for load errors.")
    for info in described:
        backbones = ", ".join(cast(list[str], info["backbones"]))
        out.rule(f"[bold]{info['name']}[/]  ({info['kind']}; backbones {backbones})")
        out.print(_escape(str(info["summary"])))
        if info["paper"]:
            out.print(f"paper: {_escape(str(info['paper']))}")
        out.print(f"plugin: {info['plugin']}")
        for family, reason in cast(dict[str, str], info["unsupported_backbones"]).items():
            out.print(f"not on {family}: {_escape(reason)}")
        sections = [("params", cast(list[dict[str, Any]], info["params"]))]
        if "training" in info:
            sections.append(("training", cast(list[dict[str, Any]], info["training"])))
        for title, fields in sections:
            table = Table(title=title, show_lines=False, expand=False)
            for col in ("parameter", "type", "default", "description"):
                table.add_column(col, overflow="fold")
            for f in fields:
                table.add_row(
                    f["name"],
                    _escape(f["type"]),
                    _escape(json.dumps(f["default"], default=str)),
                    _escape(f["description"]),
                )
            out.print(table)


@app.command()
@user_errors
def schema() -> None:
    """Print the JSON Schema of recipes, including every installed method's parameters."""
    from conceptedit.recipe.loader import schema_for

    print(json.dumps(schema_for(host()).json_schema(), indent=2))


# --------------------------------------------------------------------------- validate / apply

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: path.to.key=value (repeatable).", metavar="PATH=VALUE"),
]


@app.command()
@user_errors
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the resolved recipe as JSON.")] = False,
) -> None:
    """Check a recipe; report every problem at once with file, line, YAML path and a fix."""
    from conceptedit.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides=set_ or [], host=host())
    resolved = loaded.recipe.model_dump(mode="json")
    if as_json:
        print(json.dumps(resolved, indent=2))
        return
    edits = ", ".join(f"{label}" for label in _edit_labels(loaded.recipe))
    out.print(f"[green]ok[/] {recipe}: model {loaded.recipe.model.id}, edits: {edits}")


@app.command()
@user_errors
def concepts(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    only: Annotated[str | None, typer.Option("--only", help="Show only this concept set.")] = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: set name -> list of pairs.")] = False,
) -> None:
    """Print every concept set's prompt pairs as the recipe expands them (generated sets included)."""
    from dataclasses import asdict

    from conceptedit.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides=set_ or [], host=host())
    sets = {name: pairs for name, pairs in loaded.concepts.items() if only is None or name == only}
    if only is not None and not sets:
        raise typer.BadParameter(f"no concept set named {only!r}; have: {', '.join(loaded.concepts) or 'none'}")
    if as_json:
        print(json.dumps({name: [asdict(p) for p in pairs] for name, pairs in sets.items()}, indent=2))
        return
    for name, pairs in sets.items():
        spec = loaded.recipe.concepts[name].generate
        origin = f", from {spec.source} {json.dumps(spec.options)}" if spec is not None else ""
        out.print(_escape(f"{name}: {len(pairs)} pair(s){origin}"), soft_wrap=True)
        for pair in pairs:
            out.print(_escape(f"  {pair.source}  ->  {pair.target}"), soft_wrap=True)


def _edit_labels(recipe: Any) -> list[str]:
    labels = []
    for item in recipe.edits:
        kind = getattr(item, "method", "group")
        labels.append(item.label if item.label == kind else f"{item.label} ({kind})")
    return labels


@app.command("apply")
@user_errors
def apply_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    model: Annotated[str | None, typer.Option(help="Base model: hub id, folder, .safetensors or builtin:NAME.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder (default: recipe's output.dir).")] = None,
    set_: SetOption = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and load; write nothing.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Apply a recipe's edits to its model and write a run folder."""
    from conceptedit.run import apply

    if resume and out_dir is None:
        raise typer.BadParameter("--resume needs --out RUN_DIR (the folder the interrupted run was writing)")
    result = apply(
        recipe,
        overrides=set_ or [],
        model=model,
        device=device,
        out=out_dir,
        dry_run=dry_run,
        resume=resume,
        quiet=quiet or as_json,
        host=host(),
    )
    if as_json:
        print(json.dumps(_run_json(result, dry_run), indent=2))
    elif quiet:
        return
    elif dry_run:
        out.print(
            f"[green]dry run ok[/]: would write {result.manifest['plan']} "
            f"(backbone {result.manifest['backbone']}); nothing was written"
        )
    else:
        _print_run(result)


def _run_json(result: Any, dry_run: bool) -> dict[str, Any]:
    return {
        "run_dir": str(result.run_dir) if result.run_dir else None,
        "changed": result.changed,
        "edit_scope": result.manifest.get("edit_scope") if not dry_run else None,
        "edits": [o.as_dict() for o in result.outcomes],
        "dry_run": dry_run,
        "evaluation": [r.as_dict() for r in result.evaluation],
        **({"plan": result.manifest} if dry_run else {}),
    }


def _print_run(result: Any) -> None:
    """The run's edits as a table, then its evaluation's before/after tables."""
    table = Table(title=f"run {result.run_dir}")
    for col in ("edit", "method", "tensors changed", "seconds", "peak RSS (MiB)", "notes"):
        table.add_column(col)
    for o in result.outcomes:
        notes = ""
        if "last_losses" in o.details:
            notes = f"{o.details['steps']} steps, final loss {o.details['last_losses'].get('total', float('nan')):.4g}"
        table.add_row(
            o.label, o.method, str(len(o.changed)), f"{o.seconds:.2f}", f"{o.peak_rss_bytes / 2**20:.0f}", notes
        )
    out.print(table)
    out.print(f"{len(result.changed)} tensors differ from the base model; saved to {result.run_dir}")
    scope = result.manifest.get("edit_scope") or {}
    if scope.get("scope") == "text_encoder":
        out.print(f"edit.safetensors is a {scope['portable']}")
    if result.evaluation:
        from conceptedit.evaluation.evaluate import print_results

        print_results(result.evaluation, out)


# --------------------------------------------------------------------------- export


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="lora, kohya, single-file, diffusers, te-delta, delta...")
    ] = None,
    list_formats: Annotated[bool, typer.Option("--list", help="Name the formats this run can be written in.")] = False,
    rank: Annotated[int | None, typer.Option(help="LoRA formats: one rank for every matrix.")] = None,
    max_error: Annotated[
        float | None, typer.Option("--max-error", help="LoRA formats: per matrix, the smallest rank within this error.")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Another format option, KEY=VALUE (YAML value).")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Export folder (default RUN/exports/FORMAT).")] = None,
    base: Annotated[
        str | None, typer.Option(help="The base model, when the one the run names is not where it was.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")] = False,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", help="Then upload the export folder to this Hub repo.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write a run in a format other tools load: LoRA, kohya, single-file checkpoint, diffusers folder."""
    from conceptedit.export_run import export, export_formats
    from conceptedit.export_run import push_to_hub as upload

    plugin_host = host()
    if list_formats:
        _print_formats(export_formats(run_dir, base=base, host=plugin_host), as_json)
        return
    if fmt is None:
        raise typer.BadParameter("name a format with --format (or see them with --list)")
    options = _export_options(rank, max_error, option or [])
    result = export(run_dir, fmt, options=options, out=out_dir, base=base, overwrite=overwrite, host=plugin_host)
    url = upload(result.folder, push_to_hub) if push_to_hub else None
    if as_json:
        record = json.loads((result.folder / "export.json").read_text(encoding="utf-8"))
        print(json.dumps({"folder": str(result.folder), "uploaded": url, **record}, indent=2))
        return
    _print_export(result, url)


def _export_options(rank: int | None, max_error: float | None, items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if rank is not None:
        options["rank"] = rank
    if max_error is not None:
        options["max_error"] = max_error
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--option {item!r}: write KEY=VALUE, e.g. --option rank=16")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _print_formats(available: dict[str, str | None], as_json: bool) -> None:
    if as_json:
        print(json.dumps({name: {"available": why is None, "why_not": why} for name, why in available.items()}))
        return
    table = Table(title="export formats for this run")
    table.add_column("format")
    table.add_column("available")
    for name, why in available.items():
        table.add_row(name, "yes" if why is None else f"no: {why}")
    out.print(table)


def _print_export(result: Any, url: str | None) -> None:
    check = result.check
    out.print(f"wrote {result.format} to {result.folder}: {', '.join(result.report.files)}")
    if check.get("checked"):
        out.print(
            f"loaded back and compared with the edit: weights within {check['weights_max_relative_error']:.3g} "
            f"(relative), images differ by {check['pixel_mean_abs_diff']:.3g} on average "
            f"(max {check['pixel_max_abs_diff']:.3g}, 8-bit values)"
        )
    else:
        out.print(f"[yellow]not checked[/]: {_escape(check.get('why', ''))}")
    for note in result.report.notes:
        out.print(f"[yellow]note[/]: {_escape(note)}", soft_wrap=True)
    if url:
        out.print(f"uploaded to {url}")


# --------------------------------------------------------------------------- generate / env


@app.command()
@user_errors
def generate(
    target: Annotated[str, typer.Argument(help="Model id/path/builtin:NAME, or a run folder.")],
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    seed: Annotated[int, typer.Option(help="Seed of the first image.")] = 0,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Images (seeds seed..seed+n-1).")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 30,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="For a run: also the base model, as a grid.")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "auto",
    out_path: Annotated[Path | None, typer.Option("--out", help="PNG file, or folder for several images.")] = None,
) -> None:
    """Generate images with a model or a run; --compare-base writes a before/after grid."""
    from conceptedit.evaluation.sampling import Sampling, grid
    from conceptedit.evaluation.sampling import generate as sample
    from conceptedit.io.atomic import atomic_write_bytes
    from conceptedit.run import is_run_dir, load_target, resolve_device

    if compare_base and not is_run_dir(target):
        raise typer.BadParameter("--compare-base needs a run folder as TARGET")
    host()  # load --plugins-dir plugins before a run folder's backbone is resolved
    edited, base = load_target(target, device=resolve_device(device))
    sampling = Sampling(steps=steps, guidance=guidance)
    images = sample(edited, prompt, seed, sampling, count)
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
    if compare_base:
        assert base is not None
        before = sample(base, prompt, seed, sampling, count)
        picture = grid([("base", before), ("edited", images)])
        path = out_path or Path(f"{slug}-seed{seed}-compare.png")
        _save_png(picture, path, atomic_write_bytes)
        out.print(f"wrote {path} (top: base model, bottom: edited; seeds {seed}..{seed + count - 1})")
        return
    if count == 1:
        path = out_path or Path(f"{slug}-seed{seed}.png")
        _save_png(images[0], path, atomic_write_bytes)
        out.print(f"wrote {path}")
        return
    folder = out_path or Path(f"{slug}-seed{seed}")
    for i, image in enumerate(images):
        _save_png(image, folder / f"{slug}-seed{seed + i}.png", atomic_write_bytes)
    out.print(f"wrote {count} images to {folder}")


@app.command("eval")
@user_errors
def eval_cmd(
    target: Annotated[str, typer.Argument(help="Model id/path/builtin:NAME, or a run folder.")],
    suite: Annotated[list[str], typer.Option("--suite", help="Prompt suite (repeatable); `conceptedit suites`.")],
    option: Annotated[
        list[str] | None, typer.Option("--option", help="Suite option KEY=VALUE (YAML value), for every suite.")
    ] = None,
    compare: Annotated[
        str | None, typer.Option(help="Model or run folder to score side by side, same prompts and seeds.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="First N prompts of each suite.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
    guidance: Annotated[float | None, typer.Option(help="CFG scale (default: each prompt's own, else 7.5).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "auto",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for metrics.json.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
) -> None:
    """Score a model or a run on prompt suites, optionally next to another model (--compare)."""
    from accelerate import PartialState

    from conceptedit.api.recipe import EvaluateSpec
    from conceptedit.evaluation.evaluate import evaluate_into, print_results
    from conceptedit.evaluation.loss_curves import read_run_logs
    from conceptedit.io.progress import Reporter
    from conceptedit.run import is_run_dir, load_target, resolve_device

    plugin_host = host()
    options = _suite_options(option or [], suite, plugin_host)
    specs = [EvaluateSpec(suite=name, options=options, limit=limit, steps=steps, guidance=guidance) for name in suite]
    # a run that trained gets its loss curves in the report; read now, so a broken log fails before any model loads
    curves = read_run_logs(Path(target)) if out_dir is not None and is_run_dir(target) else []
    state = PartialState(cpu=device == "cpu")  # under accelerate launch: one share of the prompts per process
    where = state.device if state.num_processes > 1 and device != "cpu" else resolve_device(device)
    pipeline, _ = load_target(target, device=where)
    base = load_target(compare, device=where)[0] if compare else None
    main = state.is_main_process
    reporter = Reporter(quiet=quiet or not main)
    labels = (compare or "", target)
    folder = out_dir if main else None
    results = evaluate_into(
        folder, pipeline, specs, host=plugin_host, base_pipeline=base, reporter=reporter, labels=labels, curves=curves
    )
    if state.num_processes > 1:  # leave together: a rank exiting with its process group alive can abort (SIGABRT)
        state.wait_for_everyone()
        state.destroy_process_group()
    if not main:
        return
    if not quiet:
        print_results(results, out, labels=labels)
        if out_dir is not None:
            out.print(f"wrote {out_dir / 'metrics.json'}, report.md and report.html")


def _suite_options(items: list[str], suites: list[str], plugin_host: PluginHost) -> dict[str, Any]:
    """``--option KEY=VALUE`` values (YAML), checked against every named suite before any model loads."""
    import yaml
    from pydantic import ValidationError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option {item!r}: write KEY=VALUE, e.g. --option target=red")
        options[key] = yaml.safe_load(value)
    for name in suites:
        cls = plugin_host.suite(name)
        try:
            cls.Options.model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            known = ", ".join(cls.Options.model_fields)
            raise typer.BadParameter(f"{name}: {problems} (its options: {known})", param_hint="--option") from None
    return options


@app.command()
@user_errors
def suites() -> None:
    """List the installed prompt suites, their scorer and options."""
    table = Table(title="prompt suites")
    for col in ("suite", "scorer"):
        table.add_column(col, no_wrap=True)  # names are typed back in: never cut them
    for col in ("options", "summary"):
        table.add_column(col)
    for name, cls in sorted(host().registry.suites.items()):
        table.add_row(name, cls.scorer, ", ".join(cls.Options.model_fields), cls.summary)
    out.print(table)


def _save_png(image: Any, path: Path, writer: Callable[[Path, bytes], None]) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    writer(path, buffer.getvalue())


@app.command()
@user_errors
def env(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Versions of Python, torch, diffusers, transformers, conceptedit and plugins, and the device."""
    import torch

    from conceptedit.io.manifest import package_versions, plugin_versions

    info: dict[str, Any] = {
        "versions": package_versions(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(),
        "plugins": plugin_versions(host().infos.values()),
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title="conceptedit environment", show_header=False)
    for key, value in info["versions"].items():
        table.add_row(key, str(value))
    table.add_row("platform", info["platform"])
    table.add_row("device", ", ".join(info["cuda_devices"]) or "cpu (no CUDA GPU visible)")
    table.add_row("torch threads", str(info["torch_threads"]))
    for p in info["plugins"]:
        state = f"failed: {p['error']}" if p["error"] else "loaded"
        table.add_row(f"plugin {p['name']}", _escape(f"{p['version'] or p['source']} ({state})"))
    out.print(table)


def main() -> None:
    """Console-script entry point: registers plugin commands, then runs the app."""
    try:
        get_host().pm.hook.conceptedit_register_commands(app=app)
    except ConceptEditError as exc:
        err.print(f"[bold red]error:[/] {_escape(str(exc))}")
        sys.exit(2)
    app()
