"""Where Optuna studies persist: storages from URLs, their checks, and the web servers that show them."""
