"""The application that reproduces the paper: configs, the factory that builds methods and
data from them, the training loop with its run folders, checkpoints and signals, meta-testing
of runs, reports and the ``l2l-adversarial`` command line.

It is built on the library (``l2l_adversarial``: algorithms, attacks, scenarios, data and the
task runtime), which never imports it.
"""
