"""Tools around training: ``dtg split coco|voc``, ``dtg predict``, ``dtg export``.

Each module exposes ``add_parser(subparsers)``, which registers its subcommand with the
``dtg`` command line (:mod:`dtg.cli`).
"""
