"""Entry point: defines flags and dispatches to `fusion_jax.modes`; no logic lives here.

python main.py --config=configs/dyn_fusion.py --workdir=runs/dyn_fusion
python main.py --config=configs/baseline.py:quick --workdir=runs/quick --config.num_steps=300
python main.py --config=configs/baseline.py --workdir=runs/baseline --mode=eval --step=7500
python main.py --mode=compare --workdir=runs/compare --workdirs=runs/baseline,runs/dyn_fusion
"""

import signal

from absl import app, flags, logging
from ml_collections import config_flags

from fusion_jax import modes

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", sorted(modes.MODES), "What to do with the config.")
flags.DEFINE_integer("step", None, "Checkpoint step for --mode=eval (default: the latest).")
flags.DEFINE_string("workdirs", "", "--mode=compare: comma-separated finished workdirs.")
flags.mark_flags_as_required(["workdir"])


def _raise_interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt  # The loop saves its last completed chunk before exiting.


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None and FLAGS.mode != "compare":
        raise app.UsageError(f"--config is required for --mode={FLAGS.mode}.")
    # Orbax logs every save step at INFO; keep the console to our progress lines.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    modes.MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir, step=FLAGS.step, workdirs=FLAGS.workdirs)


if __name__ == "__main__":
    app.run(main)
