"""The nightly and its reports: the runner, the results schema, the report, hunting and
bisecting findings, and the pytest suite the nightly runs (``suite``)."""
