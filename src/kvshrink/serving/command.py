"""`kvshrink serve`: resolve the method, prepare the model directory, start transformers' server on it."""
from __future__ import annotations

from pathlib import Path

from ..defaults import best_spec
from .model_dir import ServedModel, ServeError, prepare_model_dir


def method_spec(model: str, method: str | None = None, profile: str | None = None) -> tuple[str, str | None]:
    """(spec, profile) for `--method SPEC` or `--profile PATH` (one of them; neither: the best measured recipe for
    the model, as `kvshrink run` picks). A profile becomes `<its method>:profile=<absolute path>`."""
    from ..methods import build_method

    if method is not None and profile is not None:
        raise ServeError(f"give --method or --profile, not both (got --method {method!r} and --profile {profile!r})")
    if profile is not None:
        from ..profile import load_profile, resolve_profile

        path = resolve_profile(profile).resolve()
        spec = f"{load_profile(path).method}:profile={path}"
        profile = str(path)
    else:
        spec = best_spec(model) if method in (None, "best") else method
    build_method(spec)  # an unknown method or option fails here, naming it
    return spec, profile


def prepare(model: str, method: str | None = None, profile: str | None = None, root: Path | None = None,
            continuous_batching: bool = False) -> ServedModel:
    """The served directory for `model` and the method; ServeError for what cannot be served."""
    if continuous_batching:
        raise ServeError("--continuous-batching is not supported: it runs transformers' own paged KV cache, not "
                         "kvshrink's; kvshrink serve answers one request at a time per model process, each with a "
                         "fresh compressed cache")
    spec, profile = method_spec(model, method, profile)
    return prepare_model_dir(model, spec, profile, root)


def serve(model: str, method: str | None = None, profile: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, device: str = "cpu", dtype: str = "auto", root: Path | None = None,
          continuous_batching: bool = False, log_level: str = "info") -> None:
    """Serve `model` with kvshrink's cache on http://host:port/v1/chat/completions until interrupted."""
    from ..models import default_dtype
    from .generation import configure_logging
    from .server import build_app, require_serving, run

    require_serving()
    served = prepare(model, method, profile, root, continuous_batching)
    if dtype == "auto":  # as `kvshrink run` loads it
        dtype = str(default_dtype(model, device)).removeprefix("torch.")
    configure_logging(log_level)
    app = build_app(served, names=(model,), device=device, dtype=dtype)
    run(app, host=host, port=port, log_level=log_level)
