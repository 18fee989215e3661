"""Starting things: engine servers, simulated hosts, routers, local fleets and Ray fleets, each
from a typed launch spec (spec.py). cli.py parses its flags into a spec and calls in here."""
