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
