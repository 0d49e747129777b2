"""From a config file to a results directory: config, build, engines, experiment, reports.

This is the experiment runner behind the ``adaquantfl`` command line and
``adaquantfl.run`` / ``adaquantfl.compare``. The federated algorithm itself
lives in :mod:`adaquantfl.fl`, :mod:`adaquantfl.compression` and
:mod:`adaquantfl.policy`, which never import this package.
"""
