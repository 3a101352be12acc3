# Tests never reach a model hub: everything they load is built locally.
import os

os.environ["HF_HUB_OFFLINE"] = "1"
