"""
pretrain.py -- the training loop arrives with lessons 06-08 (issue 5 of the tracker).

Until then this file only says so, so that the README's first command fails with a
clear message instead of "No such file".
"""

import sys

if __name__ == "__main__":
    sys.exit("pretrain.py is not written yet: it arrives with lessons 06-08. "
             "Meanwhile try `python tokenizer.py --help` and `python -m pytest -q`.")
