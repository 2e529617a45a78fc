"""``python -m diffplug.finetune dpo|spo|spo-pm ...`` (also ``accelerate launch -m diffplug.finetune ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
