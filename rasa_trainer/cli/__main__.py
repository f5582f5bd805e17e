"""``python -m rasa_trainer.cli <subcommand> ...`` (also ``accelerate launch -m rasa_trainer.cli train ...``)."""

import sys

from rasa_trainer.cli import main

sys.exit(main())
