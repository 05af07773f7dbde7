package main

import (
	"strings"
	"testing"
)

// An -only run's report keeps its own sections and drops the tables of
// the parts it did not measure; sections without tables stay.
func TestDropEmpty(t *testing.T) {
	report := "# title\n\nintro\n\n## Measured\n\n| | rota | HAProxy |\n|---|---:|---:|\n| rate | 12 | – |\n" +
		"\n## Not measured\n\ntext\n\n| | rota | HAProxy |\n|---|---:|---:|\n| rate | – | – |\n| p99 | – | – |\n" +
		"\n## No rows\n\n| targets | rota |\n|---:|---:|\n" +
		"\n## Prose\n\nno table here\n"
	got := dropEmpty(report)
	for _, want := range []string{"## Measured", "| rate | 12 | – |", "## Prose"} {
		if !strings.Contains(got, want) {
			t.Errorf("dropped %q:\n%s", want, got)
		}
	}
	for _, gone := range []string{"## Not measured", "## No rows"} {
		if strings.Contains(got, gone) {
			t.Errorf("kept %q:\n%s", gone, got)
		}
	}
}

// The median of an even number of samples is the mean of the middle two,
// not the upper one (which favoured whoever had the larger sample).
func TestMedian(t *testing.T) {
	res := results{"odd": {3, 1, 2}, "even": {4, 1, 3, 2}, "two": {10, 20}}
	for k, want := range map[string]float64{"odd": 2, "even": 2.5, "two": 15} {
		if got, ok := res.median(k); !ok || got != want {
			t.Errorf("median of %v: %v, want %v", res[k], got, want)
		}
	}
	if _, ok := res.median("none"); ok {
		t.Error("a median of no samples")
	}
}
