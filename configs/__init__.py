"""The preset configs (`--config cpu-sim`, `ascend-910b`): a package only so that a wheel
ships its YAML files beside `cluster/`, where cluster/config.py looks for them."""
