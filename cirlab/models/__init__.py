"""Paper models, one file each. Importing a model module registers it (see :mod:`cirlab.models.registry`)."""
