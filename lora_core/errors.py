"""The one base class of errors whose message is written for the user (one line per problem, with the fix)."""


class LoraFlowError(ValueError):
    """Bad input or a failed check. Printed as-is by the CLI; never worth a retry."""
