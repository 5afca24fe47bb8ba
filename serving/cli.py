"""The serving client commands of `dlpipe` (the console script is `pipelines/cli.py`):

dlpipe serve              serve the registered models over HTTP (Ctrl-C stops)
dlpipe serve --demo       start, send one real prediction, print it, stop
dlpipe serve reload       serve what the registry aliases name now (every replica, no restart)
dlpipe serve challenger SLOT --mode canary|shadow|off [--share S] [--sticky]
                          a second version beside the champion (serving/lifecycle.py)
dlpipe serve promote SLOT  the challenger becomes champion when its checks pass
dlpipe serve rollback SLOT the champion before it comes back
dlpipe serve capture --rate R [--directory D]   keep a share of requests and answers
dlpipe serve drift [--window N] [--psi-alarm X] [--off]   input drift, as replicas see it
dlpipe serve keygen NAME  make an API key, append its hash to the keys file, print it once
dlpipe predict IMAGE ...  classify images through a running server
dlpipe drift              captured requests' inputs against each model's reference
dlpipe capture export     captured classifier inputs -> data/raw/captured (DVC-tracked pool)

With API keys configured (serving/auth.py), the client commands send DLPIPE_API_KEY.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.stagekit.tracking import dashboard_url, tracking_uri
from serving.auth import (
    ENV_CLIENT_KEY,
    ENV_KEYS_FILE,
    KeyConfigError,
    append_key,
    client_headers,
    configured_key_hashes,
    listen_host,
)
from serving.drift import DriftConfig
from serving.kinds import KINDS
from serving.lifecycle import ChallengerConfig
from serving.promotion import PromotionPolicy

DEFAULT_KEYS_FILE = "api_keys.txt"

DEFAULT_URL = "http://127.0.0.1:8000"


def cmd_serve(args: argparse.Namespace) -> int:
    if args.action == "reload":
        return cmd_reload(args)
    if args.action == "keygen":
        return cmd_keygen(args)
    if args.action in ("challenger", "promote", "rollback"):
        return cmd_lifecycle(args)
    if args.action == "capture":
        return cmd_capture(args)
    if args.action == "drift":
        return cmd_drift(args)
    if args.name is not None:
        print(f"serve: error: unexpected argument {args.name!r}", file=sys.stderr)
        return 2
    try:
        key_hashes = configured_key_hashes()
    except KeyConfigError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2

    from ray import serve

    from pipelines.training.cluster import connect_ray
    from serving.deploy import DeployError, dashboard_address, deploy_app, wait_until_running
    from serving.kinds import KINDS, NO_MODEL

    # Fail here, in one line, rather than in a replica's traceback.
    sources: dict[str, str] = {}
    for kind in KINDS:
        named = getattr(args, kind.source_arg)
        source = named or kind.default_model
        if Path(source).exists():
            # Replicas do not run in this directory: a folder must reach them absolute.
            source = str(Path(source).resolve())
        error = _check_model(source, kind.slot)
        if error and not named and not kind.required:  # an optional default: serve without it
            paths = ", ".join(route.path for route in kind.routes)
            print(f"(no {kind.title}: {error}; {paths} off)")
            source, error = NO_MODEL, None
        if error:
            print(
                f"serve: error: {error}\n(run the pipeline first: `make demo` or `dvc repro`)",
                file=sys.stderr,
            )
            return 2
        sources[kind.source_arg] = source
    dashboard = connect_ray() or dashboard_address()
    app = _app_config(args, sources, key_hashes)
    host, why = listen_host(args.host, bool(key_hashes), args.allow_unauthenticated)
    print(why)
    print(
        f"starting the Serve app with models {', '.join(sources.values())} "
        f"(through the Serve REST API at {dashboard}) ...",
        flush=True,
    )
    # Deployed as a config (what `serve deploy` does), so `dlpipe serve reload` can change
    # the served versions on every replica without restarting them.
    try:
        deploy_app(dashboard, app)
        wait_until_running(dashboard, "dlpipe")
    except DeployError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{args.port}"
    served = [kind.slot for kind in KINDS if sources[kind.source_arg] != NO_MODEL]
    try:
        if args.demo:
            return _demo_request(
                url,
                args.demo_image,
                served,
                with_mlm=sources["mlm_model"] != NO_MODEL,
                with_generator=sources["generator_model"] != NO_MODEL,
            )
        _print_endpoints(url, served)
        # Set after Ray's start, which installs its fault handler for SIGTERM (a stack dump).
        signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)
        print("serving; press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the app ...", flush=True)
        return 0
    finally:
        # Only our application: on a shared cluster other Serve apps keep running.
        try:
            serve.delete("dlpipe")
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: no traceback
            print("serve: interrupted while stopping; `serve shutdown` stops what is left")


def _stop_as_on_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM (`docker stop`, systemd, Kubernetes) stops `dlpipe serve` as Ctrl-C does."""
    raise KeyboardInterrupt


DEMO_SHUTDOWN_LOOP_S = 0.1
"""How often a stopping demo replica checks for requests still in flight (Serve: 2 s)."""


def _app_config(
    args: argparse.Namespace, sources: dict[str, str], key_hashes: dict[str, str]
) -> dict:
    """serving/config.yaml's application with this command's models, address and API key
    hashes (from this shell's environment, not the cluster's), and at most as many replicas
    as the cluster has CPUs for (`threads` each) or `--max-replicas`."""
    import ray

    from serving.deploy import default_app

    app = default_app()
    app["args"].update(
        **sources,
        tracking_uri=tracking_uri(),
        threads=args.threads,
        http={
            **app["args"]["http"],
            "host": args.host,
            "port": args.port,
            "api_keys": key_hashes,
            "allow_unauthenticated": args.allow_unauthenticated,
        },
    )
    for deployment in app.get("deployments", []):
        autoscaling = deployment.get("autoscaling_config")
        if autoscaling:
            fit = max(1, int(ray.cluster_resources().get("CPU", 1)) // args.threads)
            if args.max_replicas is not None:
                fit = min(fit, args.max_replicas)
            autoscaling["max_replicas"] = min(autoscaling["max_replicas"], fit)
            autoscaling["min_replicas"] = min(autoscaling["min_replicas"], fit)
            app["args"]["max_replicas"] = autoscaling["max_replicas"]  # sizes GPU shares
    if args.demo:
        # The demo stops the app once its own requests are answered: nothing to drain, and
        # no wait for Serve's shutdown loop (each 2 s by default, twice in a `make demo`).
        app["args"]["http"]["drain_s"] = 0
        for deployment in app.get("deployments", []):
            deployment["graceful_shutdown_wait_loop_s"] = DEMO_SHUTDOWN_LOOP_S
    return app


def _check_model(source: str, slot: str) -> str | None:
    """Why `source` cannot be served in `slot` (None when it can, or is left out): the same
    loading and checks (hashes, parity sample) a replica runs."""
    from serving.kinds import NO_MODEL
    from serving.model_slots import LOAD_ERRORS, load_predictor

    if source == NO_MODEL:
        return None
    try:
        load_predictor(slot, source, tracking_uri(), use_gpu=False)
    except LOAD_ERRORS as exc:  # e.g. a regression model: /v1/classify serves classifiers
        return str(exc)
    return None


def cmd_reload(args: argparse.Namespace) -> int:
    """Move the app's models to the versions their aliases name now, on every replica."""
    from serving.deploy import DeployError, dashboard_address, reload_models, wait_for_versions

    dashboard = args.dashboard or dashboard_address()
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        versions = reload_models(dashboard, "dlpipe", tracking_uri())
        if not versions:
            print("reload: the app serves no registry alias: nothing to reload")
            return 0
        print(f"reload: asked every replica for {versions}; waiting for {url}/v1/models ...")
        settled = wait_for_versions(url, versions)
    except DeployError as exc:
        print(f"reload: error: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for slot, model in settled.items():
        if model["version"] == versions[slot]:
            print(f"  {slot}: {model['name']} version {model['version']} (@{model['alias']})")
        else:
            failed += 1
            reason = model["failed_reload"]["error"]
            print(
                f"  {slot}: version {versions[slot]} REFUSED, version {model['version']} "
                f"keeps serving: {reason}"
            )
    return 1 if failed else 0


def cmd_lifecycle(args: argparse.Namespace) -> int:
    """`dlpipe serve challenger | promote | rollback SLOT` (serving/promotion.py)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from serving.deploy import DeployError, dashboard_address
    from serving.model_slots import LOAD_ERRORS
    from serving.promotion import (
        promote,
        rollback,
        set_challenger,
        wait_for_challenger,
    )

    action, slot = args.action, args.name
    if slot not in {kind.slot for kind in KINDS}:
        slots = ", ".join(kind.slot for kind in KINDS)
        named = f"no slot {slot!r}" if slot else "name the slot"
        print(f"{action}: error: {named}: dlpipe serve {action} SLOT ({slots})", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(tracking_uri())
    dashboard = args.dashboard or dashboard_address()
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        if action == "challenger":
            settings = {
                key: value
                for key, value in (
                    ("mode", args.mode),
                    ("share", args.share),
                    ("sticky", args.sticky),
                    ("shadow_share", args.shadow_share),
                    ("shadow_budget", args.shadow_budget),
                )
                if value is not None
            }
            config = set_challenger(dashboard, slot, settings, args.challenger, args.alias)
            entry = wait_for_challenger(url, slot, config)
            if config is None:
                print(f"{slot}: no challenger; {entry['name']} version {entry['version']} alone")
            else:
                shown = entry["challenger"]
                print(
                    f"{slot}: champion {entry['name']} version {entry['version']}, challenger "
                    f"{shown['name']} version {shown['version']}: mode {config.mode}"
                    + (f", share {config.share:g}" if config.mode == "canary" else "")
                    + (" (sticky per client)" if config.mode == "canary" and config.sticky else "")
                    + (
                        f", copied share {config.shadow_share:g} within {config.shadow_budget:g} "
                        "of the replica's time"
                        if config.mode == "shadow"
                        else ""
                    )
                )
            return 0
        if action == "promote":
            chosen = {
                key: value
                for key in ("margin", "min_agreement", "min_shadowed")
                if (value := getattr(args, key)) is not None
            }
            policy = PromotionPolicy(**chosen)
            checks, version = promote(dashboard, url, slot, policy)
            verdict = f"promoted: version {version} is champion" if version else "NOT promoted"
        else:
            checks, version = rollback(dashboard, url, slot)
            verdict = (
                f"rolled back: version {version} is champion" if version else "NOT rolled back"
            )
    except (DeployError, *LOAD_ERRORS, MlflowException, urllib.error.URLError) as exc:
        # A refusal, a model that will not load, the registry or the app not answering.
        print(f"{action}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{action} {slot}:")
    for check in checks:
        print(check.line())
    print(verdict + ("" if version else "; the champion keeps serving"))
    return 0 if version else 1


def cmd_capture(args: argparse.Namespace) -> int:
    """`dlpipe serve capture --rate R [--directory D]`, or `--rate 0` ... `--off` to stop."""
    from serving.deploy import DeployError, dashboard_address, get_json, set_capture

    dashboard = args.dashboard or dashboard_address()
    url = args.url or f"http://127.0.0.1:{args.port}"
    settings = None
    if not args.off:
        settings = {
            key: value
            for key, value in (("rate", args.rate), ("directory", args.directory))
            if value is not None
        }
        if "directory" in settings:  # the replicas do not run in this directory
            settings["directory"] = str(Path(settings["directory"]).resolve())
    try:
        set_capture(dashboard, settings)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listing = get_json(f"{url}/v1/models")
            refused = listing.get("capture_error") or ""
            # A refusal of this very directory; one of the setting before may still show
            # on a replica that has not taken this one yet.
            if settings and settings.get("directory") and settings["directory"] in refused:
                raise DeployError(f"the replicas refused: {refused}")
            shown = listing.get("capture")
            if (
                not refused
                and (shown is None) == (settings is None)
                and (shown is None or all(shown.get(k) == v for k, v in settings.items()))
            ):
                break
            time.sleep(0.5)
        else:
            raise DeployError(f"the replicas at {url} did not take the capture setting in 60 s")
    except (DeployError, OSError) as exc:
        print(f"capture: error: {exc}", file=sys.stderr)
        return 2
    if shown is None:
        print("capture: off")
    else:
        print(f"capture: {shown['rate']:g} of requests to {shown['directory']} (JSON lines)")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    """`dlpipe serve drift [--window N] [--psi-alarm X] [--check-every N] [--off]`: change
    how the replicas watch input drift (serving/drift.py), then print each slot's state."""
    from serving.deploy import (
        DeployError,
        dashboard_address,
        get_json,
        set_drift,
        wait_for_drift,
    )

    url = args.url or f"http://127.0.0.1:{args.port}"
    settings = {
        key: value
        for key, value in (
            ("window", args.window),
            ("psi_alarm", args.psi_alarm),
            ("check_every", args.check_every),
        )
        if value is not None
    }
    if args.off or settings:
        settings["enabled"] = not args.off
    try:
        if settings:
            set_drift(args.dashboard or dashboard_address(), settings)
            listing = wait_for_drift(url, settings)
        else:
            listing = get_json(f"{url}/v1/models")
    except (DeployError, OSError) as exc:
        print(f"drift: error: {exc}", file=sys.stderr)
        return 2
    for model in listing["models"]:
        print(f"{model['slot']}: {drift_line(model.get('drift'))}")
    return 0


def drift_line(state: dict[str, Any] | None) -> str:
    """One slot's drift state (/v1/models' `drift`) in a line."""
    if state is None:
        return "not watched (drift off)"
    if "error" in state:
        return f"not watched: {state['error']}"
    if state["filled"] < state["window"]:
        return f"{state['filled']} of {state['window']} inputs seen; no verdict yet"
    top = ", ".join(f"{name} {psi:.3f}" for name, psi in state["top_psi"].items())
    verdict = "ALARM" if state["alarm"] else "no alarm"
    return (
        f"{verdict}: max PSI {state['max_psi']:.3f} (alarm at {state['psi_alarm']:g}) over the "
        f"last {state['window']} inputs; highest: {top}"
    )


def cmd_drift_report(args: argparse.Namespace) -> int:
    """`dlpipe drift [--directory captures]`: captured inputs against each model's reference."""
    from serving.captured import CaptureReadError, drift_report, report_lines
    from serving.drift import DriftConfig, DriftConfigError

    try:
        config = DriftConfig.parse(
            {"window": args.window, "psi_alarm": args.psi_alarm, "check_every": 10}
        )
        report = drift_report(args.directory, tracking_uri(), config)
    except (CaptureReadError, DriftConfigError) as exc:
        print(f"drift: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 1 if any(m.get("drifted") is True for m in report["models"]) else 0


def cmd_capture_export(args: argparse.Namespace) -> int:
    """`dlpipe capture export`: the classifier's captured inputs as an unlabeled pool."""
    from serving.captured import CaptureReadError, export_pool

    try:
        done = export_pool(args.directory, args.output, tracking_uri(), track=not args.no_dvc)
    except CaptureReadError as exc:
        print(f"capture export: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{done['written']:,} new input(s) from {done['requests']:,} captured requests written "
        f"to {done['output']} ({done['already_there']:,} already there)"
    )
    if done["dvc_file"]:
        print(f"tracked by DVC: {done['dvc_file']} (git add it with your change)")
    print(
        f"train on it: set pseudolabel.unlabeled_source: {done['source']} in params.yaml, "
        "then dvc repro export_pseudolabel"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new key for `args.name`: its hash appended to the keys file, the key printed once."""
    if not args.name:
        print("keygen: error: name the key's holder: dlpipe serve keygen NAME", file=sys.stderr)
        return 2
    path = Path(args.keys_file or os.environ.get(ENV_KEYS_FILE) or DEFAULT_KEYS_FILE)
    try:
        key = append_key(path, args.name)
    except KeyConfigError as exc:
        print(f"keygen: error: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(
        f"(the key for {args.name!r}, shown this once; its sha256 is in {path}. Serve with "
        f"{ENV_KEYS_FILE}={path}; clients send Authorization: Bearer KEY, dlpipe's "
        f"commands {ENV_CLIENT_KEY}=KEY)",
        file=sys.stderr,
    )
    return 0


def _print_endpoints(url: str, served: list[str]) -> None:
    from serving.kinds import endpoints

    # Only the served kinds' routes: the others answer 404 ("... off" said so above).
    print("\nendpoints:\n  " + "\n  ".join(endpoints(url, served)))
    print("swap models after moving a registry alias: dlpipe serve reload")
    print(f"dashboard: run `make ui` (or `dlpipe ui`), then open {dashboard_url()}")


def _demo_image() -> Path:
    """A test-split-sized sample: the first image of the bundled digits' class '7'."""
    return min(Path("data/raw/digits/7").glob("*.png"))


DEMO_SENTENCE = "Raise an exception if the [MASK] is not found."


DEMO_SEQUENCES = Path("data/prepared/timeseries/x_test.npy")
"""Where the demo takes a series for a time-series classifier (prepare_timeseries' output)."""


def _demo_payload(url: str, image: str | None) -> tuple[dict, str]:
    """The demo's /v1/classify body and how to name it: an image, or for a classifier of
    time series the first test series of the prepared data."""
    with urllib.request.urlopen(
        urllib.request.Request(f"{url}/v1/models", headers=client_headers()), timeout=30
    ) as response:
        models = json.loads(response.read())["models"]
    kinds = [m["input"]["kind"] for m in models if m.get("slot") == "classifier"]
    if kinds == ["sequence"] and not image:
        import numpy as np

        series = np.load(DEMO_SEQUENCES)[0]  # (T, C), NaN after its last step
        steps = series[~np.isnan(series[:, 0])]
        shown = f"series 0 of {DEMO_SEQUENCES}, {len(steps)} steps x {steps.shape[1]} channels"
        return {"sequences": [steps.tolist()]}, shown
    path = Path(image) if image else _demo_image()
    return {"images": [base64.b64encode(path.read_bytes()).decode()]}, f"image {path}"


def _demo_request(
    url: str,
    image: str | None,
    served: list[str],
    with_mlm: bool = False,
    with_generator: bool = False,
) -> int:
    try:
        payload, shown = _demo_payload(url, image)
    except FileNotFoundError as exc:
        print(f"serve: error: no demo input: {exc.filename} (dvc repro first)", file=sys.stderr)
        return 1
    print(f"\nPOST {url}/v1/classify  ({shown})", flush=True)
    try:
        response = _post_json(f"{url}/v1/classify", payload)
    except urllib.error.HTTPError as exc:
        print(f"serve: error: {_http_error(exc)}", file=sys.stderr)
        return 1
    prediction = response["predictions"][0]
    print(
        json.dumps(
            {
                "label": prediction["label"],
                "confidence": round(prediction["confidence"], 4),
                "model": response["model"],
                "version": response["version"],
            },
            indent=2,
        )
    )
    if with_mlm:
        print(f"\nPOST {url}/v1/fill-mask  ({DEMO_SENTENCE!r})", flush=True)
        try:
            filled = _post_json(f"{url}/v1/fill-mask", {"texts": [DEMO_SENTENCE], "top_k": 3})
        except urllib.error.HTTPError as exc:
            print(f"serve: error: {_http_error(exc)}")
            return 1
        top = filled["results"][0]["masks"][0]["predictions"]
        print(json.dumps({p["token"]: round(p["score"], 3) for p in top}))
    if with_generator:
        print(f"\nPOST {url}/v1/generate  (count 4, seed 0)", flush=True)
        try:
            drawn = _post_json(f"{url}/v1/generate", {"count": 4, "seed": 0})
        except urllib.error.HTTPError as exc:
            print(f"serve: error: {_http_error(exc)}")
            return 1
        sizes = [len(base64.b64decode(image)) for image in drawn["images"]]
        print(
            f"{len(sizes)} PNG images ({', '.join(map(str, sizes))} bytes) from "
            f"{drawn['model']} version {drawn['version']}"
        )
    _print_endpoints(url, served)
    print("(demo: stopping the app; `make serve` keeps it running)")
    return 0


def _http_error(exc: urllib.error.HTTPError) -> str:
    hint = f" (set {ENV_CLIENT_KEY} to one of the app's API keys)" if exc.code == 401 else ""
    return f"HTTP {exc.code}: {exc.read().decode(errors='replace')}{hint}"


def _post_json(url: str, payload: dict, timeout: float = 30.0) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **client_headers()},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def cmd_predict(args: argparse.Namespace) -> int:
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"predict: error: {missing[0]}: no such file", file=sys.stderr)
        return 2
    payload = {"images": [base64.b64encode(Path(p).read_bytes()).decode() for p in args.images]}
    try:
        response = _post_json(f"{args.url.rstrip('/')}/v1/classify", payload)
    except urllib.error.HTTPError as exc:
        print(
            f"predict: error: {_http_error(exc)}",
            file=sys.stderr,
        )
        return 2
    except urllib.error.URLError as exc:
        print(
            f"predict: error: cannot reach {args.url} ({exc.reason}); is `dlpipe serve` running?",
            file=sys.stderr,
        )
        return 2
    for path, prediction in zip(args.images, response["predictions"]):
        print(f"{path}\t{prediction['label']}\t{prediction['confidence']:.4f}")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `predict` to the `dlpipe` command's subcommands."""
    serve = sub.add_parser("serve", help="serve the model over HTTP with Ray Serve")
    serve.add_argument(
        "action",
        nargs="?",
        choices=(
            "start",
            "reload",
            "keygen",
            "challenger",
            "promote",
            "rollback",
            "capture",
            "drift",
        ),
        default="start",
        help="start (default) the app; reload: serve the versions the registry aliases "
        "name now, on every replica, without a restart; keygen NAME: make an API key; "
        "challenger SLOT: serve a second version beside the champion (canary, shadow, off); "
        "promote SLOT: the challenger becomes champion if its checks pass; rollback SLOT; "
        "capture: keep a share of requests and answers in files; drift: show or set how "
        "the replicas watch input drift",
    )
    serve.add_argument(
        "name",
        nargs="?",
        help="keygen: who the key is for, e.g. alice; challenger, promote, "
        "rollback: the slot (classifier, mlm, segmenter, generator)",
    )
    capture = serve.add_argument_group("capture")
    capture.add_argument("--rate", type=float, help="the share of requests kept (0..1)")
    capture.add_argument(
        "--directory", help="where the JSON-lines files go (default ./captures, made absolute)"
    )
    capture.add_argument("--off", action="store_true", help="stop capturing (drift: watching)")
    drift = serve.add_argument_group("drift")
    drift.add_argument(
        "--window", type=int, help=f"inputs compared with the reference ({DriftConfig.window})"
    )
    drift.add_argument("--psi-alarm", type=float, help="PSI that raises the alarm (0.25)")
    drift.add_argument("--check-every", type=int, help="inputs between alarm checks (10)")
    lifecycle = serve.add_argument_group("challenger, promote, rollback")
    lifecycle.add_argument("--mode", choices=("canary", "shadow", "off"))
    lifecycle.add_argument(
        "--share", type=float, help="canary: the share of requests the challenger answers (0..1)"
    )
    lifecycle.add_argument(
        "--sticky",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="canary: all of a client's requests to one model (by API key, else X-Client-Id)",
    )
    lifecycle.add_argument(
        "--shadow-share", type=float, help="shadow: the share of requests copied (default 1)"
    )
    lifecycle.add_argument(
        "--shadow-budget",
        type=float,
        help="shadow: the most of each replica's time the copies take; under a load that "
        f"fills it, a sample is copied (default {ChallengerConfig.shadow_budget})",
    )
    lifecycle.add_argument(
        "--challenger", help="the challenger's model: models:/NAME@ALIAS, models:/NAME/VERSION"
    )
    lifecycle.add_argument(
        "--alias", help="the challenger is the champion's model at this alias (default challenger)"
    )
    lifecycle.add_argument(
        "--margin",
        type=float,
        help="promote: how much worse than the champion's card figure may be "
        f"(default {PromotionPolicy.margin})",
    )
    lifecycle.add_argument(
        "--min-agreement",
        type=float,
        help=f"promote: shadow agreement needed (default {PromotionPolicy.min_agreement})",
    )
    lifecycle.add_argument(
        "--min-shadowed",
        type=int,
        help=f"promote: shadowed requests needed (default {PromotionPolicy.min_shadowed})",
    )
    for kind in KINDS:
        default = kind.default_model + ("" if kind.required else " when registered")
        serve.add_argument(
            f"--{kind.source_arg.replace('_', '-')}",
            help=f"{kind.title} for {', '.join(r.path for r in kind.routes)}: registry URI "
            f"(models:/NAME@ALIAS), an export folder, or none (default: {default})",
        )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; another than 127.0.0.1 needs API keys "
        f"({ENV_KEYS_FILE} or DLPIPE_API_KEYS) or --allow-unauthenticated",
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on --host without API keys: anyone who reaches the port is let in",
    )
    serve.add_argument(
        "--keys-file",
        help=f"keygen: the keys file (default ${ENV_KEYS_FILE} or {DEFAULT_KEYS_FILE})",
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--threads", type=int, default=1, help="onnxruntime threads per replica")
    serve.add_argument(
        "--max-replicas",
        type=positive_int,
        help="autoscaling's upper bound (default: serving/config.yaml's, at most CPUs / threads); "
        "1 keeps one replica, e.g. when the clients share this machine's CPUs",
    )
    serve.add_argument("--demo", action="store_true", help="send one prediction, print it, stop")
    serve.add_argument("--demo-image", help="image for --demo (default: a bundled digit)")
    serve.add_argument(
        "--dashboard",
        help="reload: the Ray dashboard (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)",
    )
    serve.add_argument("--url", help="reload: the app's URL (default http://127.0.0.1:PORT)")
    serve.set_defaults(func=cmd_serve)

    drift = sub.add_parser(
        "drift", help="captured requests' inputs against each model's training reference"
    )
    drift.add_argument("--directory", default="captures", help="the capture directory")
    drift.add_argument(
        "--window", type=int, default=DriftConfig.window, help="inputs per window (in order)"
    )
    drift.add_argument("--psi-alarm", type=float, default=DriftConfig.psi_alarm)
    drift.add_argument("--json", help="also write the report to this JSON file")
    drift.set_defaults(func=cmd_drift_report)

    capture = sub.add_parser("capture", help="captured requests into the pipeline")
    capture.add_argument("action", choices=("export",), help="export: an unlabeled pool")
    capture.add_argument("--directory", default="captures", help="the capture directory")
    capture.add_argument("--output", default="data/raw/captured", help="the pool's folder")
    capture.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the pool")
    capture.set_defaults(func=cmd_capture_export)

    predict = sub.add_parser("predict", help="classify image files through a running server")
    predict.add_argument("images", nargs="+", help="PNG/JPEG files")
    predict.add_argument("--url", default=DEFAULT_URL)
    predict.set_defaults(func=cmd_predict)
