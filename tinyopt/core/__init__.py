"""What every layer shares, importing nothing heavy: errors, the record's names, the config, the search
space, plots, signals, locks, URLs.
"""
