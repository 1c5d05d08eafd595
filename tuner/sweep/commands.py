"""The commands a sweep runs per scenario, as in-process calls of the simulator and the tuners.

Each entry maps the CLI command's option names (with underscores) onto one package function,
exactly as `simtune/cli/*.py` does, and returns the JSON object that command prints with
`--json`, plus the rent of the cluster where its spec carries `price_per_device_hour`:

| command        | function               | time column          | cost column                        |
|----------------|------------------------|----------------------|------------------------------------|
| simulate train | simulate_training      | iteration_time_s     | cost_per_million_tokens_usd        |
| simulate serve | simulate_serving       | makespan_s           | cost_per_million_output_tokens_usd |
| simulate gnn   | simulate_gnn           | epoch_time_s         | cost_per_epoch_usd                 |
| tune train     | tune_training          | report.iteration_... | report.cost_per_million_tokens_usd |
| tune serve     | tune_serving           | report.makespan_s    | report.cost_per_million_output_... |
| tune gnn       | tune_gnn               | report.epoch_time_s  | report.cost_per_epoch_usd          |
| tune spec      | tune_speculation       | -                    | -                                  |

Besides the command's options, a scenario may set single fields of a spec option with a dotted
name: `plan.tp: 4` loads the plan named by `plan` and replaces its `tp`; `workload.seed: 3`;
`workload.arrival.rate_per_s: 2`. For `simulate train`, `plan.dp: auto` fills the devices left
by tp x pp. Costs of serving charge the whole cluster, whether the deployment uses it all or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulator.errors import SpecError


@dataclass(frozen=True)
class Command:
    name: str
    options: tuple[str, ...]          # the CLI command's option names, with underscores
    required: tuple[str, ...]
    specs: dict[str, str]             # spec options whose fields a dotted name may set -> catalog kind
    run: Callable[[dict[str, Any]], dict[str, Any]]
    time_column: str | None
    cost_column: str | None


def _merge(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in dotted.items():
        *path, last = key.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SpecError(key, value, f"{part} is not a mapping of fields")
        target[last] = value
    return out


def _spec(kind: str, ref: Any, fields: dict[str, Any]) -> Any:
    """The spec `ref` names (catalog name, path, mapping), with `fields` replaced."""
    from simulator.specs import catalog

    loaders = {"plan": catalog.load_plan, "workload": catalog.load_workload, "deployment": catalog.load_deployment,
               "model": catalog.load_model, "gnn_plan": catalog.load_gnn_plan}
    spec = loaders[kind](ref)
    if not fields:
        return spec
    return type(spec).parse(_merge(spec.to_dict(), fields), prefix=kind)


def _split(opts: dict[str, Any], option: str) -> dict[str, Any]:
    """The dotted fields `option.x.y: v` of one spec option, as {'x.y': v}."""
    prefix = option + "."
    return {k[len(prefix):]: v for k, v in opts.items() if k.startswith(prefix)}


def _cluster(opts: dict[str, Any]) -> Any:
    from simulator.specs.catalog import load_cluster

    return load_cluster(opts["cluster"], opts.get("profile"))


def _rent(cluster: Any, seconds: float) -> float | None:
    return None if cluster.price_per_s is None else cluster.price_per_s * seconds


# --- the commands --------------------------------------------------------------------------


def simulate_train(opts: dict[str, Any]) -> dict[str, Any]:
    from simulator.specs.catalog import load_model
    from simulator.training import simulate_training

    cluster, model = _cluster(opts), load_model(opts["model"])
    fields = _split(opts, "plan")
    if fields.get("dp") == "auto":
        tp, pp = fields.get("tp"), fields.get("pp")
        base = _spec("plan", opts["plan"], {})
        tp, pp = tp or base.tp, pp or base.pp
        if cluster.num_devices % (tp * pp):
            raise SpecError("plan.dp", "auto", f"tp x pp = {tp * pp} does not divide the {cluster.num_devices} "
                            f"devices of {cluster.name}")
        fields["dp"] = cluster.num_devices // (tp * pp)
    plan = _spec("plan", opts["plan"], fields)
    return simulate_training(model, cluster, plan).to_dict()


def _serving_costs(report: dict[str, Any], cluster: Any) -> dict[str, Any]:
    per_s = cluster.price_per_s
    out = {"cost_of_run_usd": _rent(cluster, report["makespan_s"]), "cost_per_million_output_tokens_usd": None,
           "cost_per_million_tokens_usd": None}
    if per_s is not None:
        if report["output_tokens_per_s"] > 0:
            out["cost_per_million_output_tokens_usd"] = per_s / report["output_tokens_per_s"] * 1e6
        if report["total_tokens_per_s"] > 0:
            out["cost_per_million_tokens_usd"] = per_s / report["total_tokens_per_s"] * 1e6
    return {**report, **out}


def simulate_serve(opts: dict[str, Any]) -> dict[str, Any]:
    from simulator.serving.simulate import simulate_serving
    from simulator.specs.catalog import load_model

    cluster = _cluster(opts)
    dep = _spec("deployment", opts["deployment"], _split(opts, "deployment"))
    wl = _spec("workload", opts["workload"], _split(opts, "workload"))
    report = simulate_serving(load_model(opts["model"]), cluster, dep, wl, exact_steps=bool(opts.get("exact_steps")))
    return _serving_costs(report.to_dict(), cluster)


def _gnn_costs(report: dict[str, Any], cluster: Any) -> dict[str, Any]:
    return {**report, "cost_per_epoch_usd": _rent(cluster, report["epoch_time_s"]),
            "cost_per_iteration_usd": _rent(cluster, report["iteration_time_s"])}


def simulate_gnn(opts: dict[str, Any]) -> dict[str, Any]:
    from simulator.gnn.simulate import simulate_gnn as run

    cluster = _cluster(opts)
    plan = _spec("gnn_plan", opts["plan"], _split(opts, "plan"))
    return _gnn_costs(run(opts["graph"], opts["model"], cluster, plan).to_dict(), cluster)


def tune_train(opts: dict[str, Any]) -> dict[str, Any]:
    from simulator.specs.catalog import load_model
    from tuner.training import tune_training

    baselines = () if opts.get("no_baselines") else ("megatron", "aceso")
    result = tune_training(load_model(opts["model"]), _cluster(opts), int(opts["global_batch_size"]),
                           opts.get("seq_length"), baselines=baselines,
                           tp_within_node=not opts.get("tp_across_nodes"))
    return result.to_dict()


def tune_serve(opts: dict[str, Any]) -> dict[str, Any]:
    from simulator.specs.catalog import load_model
    from tuner.serving import tune_serving

    cluster = _cluster(opts)
    wl = _spec("workload", opts["workload"], _split(opts, "workload"))
    result = tune_serving(load_model(opts["model"]), cluster, wl,
                          screen_requests=int(opts.get("screen_requests", 300))).to_dict()
    return {**result, "report": _serving_costs(result["report"], cluster)}


def tune_gnn(opts: dict[str, Any]) -> dict[str, Any]:
    from tuner.gnn import tune_gnn as run

    cluster = _cluster(opts)
    result = run(opts["graph"], opts["model"], cluster, max_global_batch=opts.get("max_global_batch")).to_dict()
    return {**result, "report": _gnn_costs(result["report"], cluster)}


def tune_spec(opts: dict[str, Any]) -> dict[str, Any]:
    from tuner.speculation import tune_speculation

    kwargs = {k: opts[k] for k in ("batch_sizes", "k_max", "context", "tp", "engine", "workload") if k in opts}
    if isinstance(kwargs.get("batch_sizes"), str):
        kwargs["batch_sizes"] = [int(v) for v in kwargs["batch_sizes"].split(",") if v.strip()]
    return tune_speculation(opts.get("target"), opts.get("draft"), opts.get("cluster"), opts.get("acceptance"),
                            **kwargs).to_dict()


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("simulate train", ("model", "cluster", "plan", "profile"), ("model", "cluster", "plan"),
            {"plan": "plan"}, simulate_train, "iteration_time_s", "cost_per_million_tokens_usd"),
    Command("simulate serve", ("model", "cluster", "deployment", "workload", "profile", "exact_steps"),
            ("model", "cluster", "deployment", "workload"), {"deployment": "deployment", "workload": "workload"},
            simulate_serve, "makespan_s", "cost_per_million_output_tokens_usd"),
    Command("simulate gnn", ("graph", "model", "cluster", "plan"), ("graph", "model", "cluster", "plan"),
            {"plan": "gnn_plan"}, simulate_gnn, "epoch_time_s", "cost_per_epoch_usd"),
    Command("tune train", ("model", "cluster", "global_batch_size", "seq_length", "no_baselines",
                           "tp_across_nodes", "profile"), ("model", "cluster", "global_batch_size"), {},
            tune_train, "report.iteration_time_s", "report.cost_per_million_tokens_usd"),
    Command("tune serve", ("model", "cluster", "workload", "screen_requests", "profile"),
            ("model", "cluster", "workload"), {"workload": "workload"}, tune_serve, "report.makespan_s",
            "report.cost_per_million_output_tokens_usd"),
    Command("tune gnn", ("graph", "model", "cluster", "max_global_batch"), ("graph", "model", "cluster"), {},
            tune_gnn, "report.epoch_time_s", "report.cost_per_epoch_usd"),
    Command("tune spec", ("target", "draft", "cluster", "acceptance", "batch_sizes", "k_max", "context", "tp",
                          "engine", "workload"), ("target", "draft", "cluster", "acceptance"), {},
            tune_spec, None, None),
)}


def check_names(command: Command, names: list[str]) -> None:
    """Every option and axis name is one of the command's options or `<spec option>.<field>`."""
    for name in names:
        head = name.split(".", 1)[0]
        if name in command.options or ("." in name and head in command.specs):
            continue
        dotted = f"; or <{'|'.join(command.specs)}>.<field>" if command.specs else ""
        raise SpecError(f"sweep.{name}", name, f"is not an option of `simtune {command.name}`; its options are "
                        f"{', '.join(command.options)}{dotted}")
    missing = [r for r in command.required if r not in names]
    if missing:
        raise SpecError("sweep.options", None, f"`simtune {command.name}` needs {', '.join(missing)} "
                        "(in options or axes)")
