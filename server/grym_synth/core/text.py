"""Words that carry no musical meaning in a request ("make me a 10 second piece"): the rule planner skips them
when it builds prompts, and pattern recall skips them when it matches request words against stored patterns, so
both read a request the same way."""

FILLER = frozenset(
    "a an the and or of to in on at for with me my us some please make create compose generate write give produce "
    "render i we you want would like could can need song track piece tune music sound loop clip bit about around "
    "that this it is be something long bpm tempo seconds second minutes minute secs sec mins min pattern but more "
    "less than into from by very just".split())
