"""The application that reproduces the paper: configs (``config``, ``configs``), the factory
that builds methods and data from them (``factory``), the training loop with its run folders,
checkpoints and signals (``training``, ``run_folder``, ``checkpoint``, ``signals``),
meta-validation (``meta_validation``), training and meta-testing run folders (``runs``), the
quickstart (``quickstart``), reports (``report``, ``seeds``) and the ``l2l-adversarial``
command line (``cli``, which only parses arguments and calls the modules above).

It is built on the library (``l2l_adversarial``: algorithms, attacks, scenarios, data and the
task runtime), which never imports it.
"""
