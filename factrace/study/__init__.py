"""The study: datasets (``datasets``), the objects rate (``objects``), tracing at dataset scale
(``dataset_trace``, ``dask``) and the cross-architecture report (``settings``, ``stages``, ``store``,
``report_output``, ``report``)."""
