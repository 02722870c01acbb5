"""Entry point: defines flags and dispatches to `fusion_jax.modes`; no logic lives here.

python main.py --config=configs/dyn_fusion.py --workdir=runs/dyn_fusion
python main.py --config=configs/baseline.py:quick --workdir=runs/quick --config.num_steps=300
python main.py --workdir=runs/baseline --mode=eval --step=7500
python main.py --mode=compare --workdir=runs/cmp --workdirs=runs/baseline,runs/dyn_fusion
python main.py --mode=fetch --model=smollm2

Plain user errors (a bad flag or config value, a missing workdir, ...) print one line starting
with `error:` and exit with status 1; other exceptions are bugs and keep their traceback. Ctrl-C
and SIGTERM save, then end the process by that signal (`runtime.exit_on_interrupt`).
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fusion_jax import modes, runtime
from fusion_jax.errors import UserError, disk_error
from fusion_jax.train import checkpoint

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", sorted(modes.MODES), "What to do with the config.")
flags.DEFINE_integer("step", None, "Checkpoint step for --mode=eval|analyze (default: the latest).")
flags.DEFINE_string("workdirs", "", "--mode=compare|results: finished workdirs, comma-separated.")
flags.DEFINE_string("model", None, "--mode=fetch: the pretrained model to download by name.")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag, config file or config field reported in one line."""
    try:
        args = FLAGS(argv)
        if FLAGS.config is not None:
            # A config file that failed to load raises only when the config is first read.
            FLAGS.config.get("experiment")
    except flags.Error as e:
        # A config file's own error arrives as a traceback inside the message: keep its last line.
        lines = _lines(e)
        sys.exit(f"error: {lines[0]} {lines[-1]}" if len(lines) > 1 else f"error: {lines[0]}")
    except (KeyError, AttributeError) as e:  # --config.<field> that the config does not have
        sys.exit(f"error: unknown config field {' '.join(_lines(e.args[0]))}")
    except OSError as e:  # --config=<file> that cannot be read
        sys.exit(f"error: --config: {_lines(e)[-1]}")
    return args


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.workdir is None and FLAGS.mode not in modes.NO_WORKDIR:
        sys.exit(f"error: --workdir is required for --mode={FLAGS.mode}")
    # Orbax logs every save step at INFO; keep the console to our progress lines.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    signal.signal(signal.SIGTERM, runtime.raise_interrupt)
    with runtime.exit_on_interrupt(checkpoint.wait_for_saves):
        try:
            modes.MODES[FLAGS.mode](
                FLAGS.config,
                FLAGS.workdir,
                step=FLAGS.step,
                workdirs=FLAGS.workdirs,
                model=FLAGS.model,
            )
        except (UserError, FileNotFoundError) as e:
            # FileNotFoundError: a missing input named by a flag (the LM modules raise it too).
            sys.exit(f"error: {e}")
        except Exception as e:  # a full disk or a folder that cannot be written, else a bug
            if (message := disk_error(e)) is None:
                raise
            sys.exit(f"error: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
