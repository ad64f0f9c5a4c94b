"""What the tests run on and with, apart from the tests themselves: the objectives workers import
(`tests.support.objectives:quadratic`), the process and cluster fixtures, and small helpers."""
