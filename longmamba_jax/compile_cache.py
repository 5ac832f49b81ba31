"""JAX's persistent compilation cache for the command-line entry points (docs/generation.md,
"Compile cache"): compiled programs are written to disk, so a second process on the same
machine loads them instead of compiling again.

Only the entry points (`longmamba-generate`, `python -m longmamba_jax.demo`) call
`enable_compile_cache`; importing the library changes no JAX setting. The directory is, first
found: the `directory` argument; JAX_COMPILATION_CACHE_DIR (JAX's own setting, left as the user
set it); LONGMAMBA_JAX_COMPILE_CACHE; the user cache directory
($XDG_CACHE_HOME or ~/.cache on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows)
/ longmamba_jax / jax. LONGMAMBA_JAX_COMPILE_CACHE=0 (or off, false, no) turns it off.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

__all__ = ["ENV_VAR", "add_cli_option", "default_cache_dir", "disable_compile_cache",
           "enable_compile_cache", "setup_from_args"]

ENV_VAR = "LONGMAMBA_JAX_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no", "none"}
MESSAGE = "compiling (first run only; later runs load it from {dir})..."

# jax.monitoring events (public API): a compile request that consults the persistent cache,
# a hit, and the end of a backend compile (hit or miss).
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_COMPILED = "/jax/core/compile/backend_compile_duration"


def default_cache_dir() -> Path:
    """<user cache dir>/longmamba_jax/jax, by the platform's convention."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "longmamba_jax" / "jax"


def resolve_cache_dir(directory: str | os.PathLike | None = None) -> Path | None:
    """The directory `enable_compile_cache` would use (None: turned off by the env var)."""
    if directory is not None:
        return Path(directory).expanduser()
    import jax

    user_jax_dir = jax.config.jax_compilation_cache_dir
    if user_jax_dir:
        return Path(user_jax_dir)
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip().lower() in _OFF:
        return None
    if env:
        return Path(env).expanduser()
    return default_cache_dir()


def enable_compile_cache(directory: str | os.PathLike | None = None, *,
                         announce: bool = True) -> Path | None:
    """Turns on JAX's persistent compilation cache (call before the first compile).

    Every program is cached (minimum compile time 0, unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is set), so a warm run compiles nothing.

    Args:
      directory: where to keep it (default: see the module docstring).
      announce: print "compiling (first run only...)..." to stderr once per process, when a
        program is not in the cache: at once if the cache is empty, else when a compile has
        run for a second (a new shape).

    Returns:
      The cache directory, or None when LONGMAMBA_JAX_COMPILE_CACHE turns it off.
    """
    import jax

    path = resolve_cache_dir(directory)
    if path is None:
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    if directory is not None or not jax.config.jax_compilation_cache_dir:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
    # else: JAX_COMPILATION_CACHE_DIR, set by the user, stays as it is (it may be remote)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if announce:
        _Announcer.install(path)
    return path


def disable_compile_cache() -> None:
    """Turns JAX's persistent compilation cache off for this process (`--no-compile-cache`)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def add_cli_option(parser) -> None:
    """Adds `--no-compile-cache` to an argparse parser."""
    parser.add_argument(
        "--no-compile-cache", action="store_true",
        help=f"do not keep compiled programs on disk (default: kept in "
             f"JAX_COMPILATION_CACHE_DIR, {ENV_VAR} or {default_cache_dir()}, so that later "
             "runs skip compiling)")


def setup_from_args(args) -> Path | None:
    """Applies `--no-compile-cache` (added by `add_cli_option`), else enables the cache."""
    if getattr(args, "no_compile_cache", False):
        disable_compile_cache()
        return None
    return enable_compile_cache()


class _Announcer:
    """Prints MESSAGE once per process when a compile misses the persistent cache."""

    _installed: _Announcer | None = None
    _lock = threading.Lock()

    def __init__(self, path: Path, delay_s: float = 1.0):
        self.path, self.delay_s = path, delay_s
        self.done = False
        self.timer: threading.Timer | None = None

    @classmethod
    def install(cls, path: Path) -> None:
        import jax.monitoring

        with cls._lock:
            if cls._installed is not None:
                cls._installed.path = path
                return
            cls._installed = me = cls(path)
        jax.monitoring.register_event_listener(me.on_event)
        jax.monitoring.register_event_duration_secs_listener(me.on_duration)

    def say(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        print(MESSAGE.format(dir=self.path), file=sys.stderr, flush=True)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_event(self, event: str, **_) -> None:
        if self.done:
            return
        if event == _REQUEST:
            self.cancel()
            if self.path.is_dir() and not any(self.path.iterdir()):  # cold: nothing will hit
                self.say()
                return
            self.timer = threading.Timer(self.delay_s, self.say)
            self.timer.daemon = True
            self.timer.start()
        elif event == _HIT:
            self.cancel()

    def on_duration(self, event: str, duration: float, **_) -> None:
        if event == _COMPILED:
            self.cancel()
