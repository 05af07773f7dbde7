package balancer

import "testing"

// A cursor offers the fallback after every target of the set, in order,
// and never picks it first.
func TestCursorFallback(t *testing.T) {
	a, b, x, y := NewTarget("10.0.0.1:1"), NewTarget("10.0.0.2:1"), NewTarget("10.0.0.8:1"), NewTarget("10.0.0.9:1")
	var bal Balancer
	bal.UpdateWithFallback(RoundRobin, []Entry{{a, 1}, {b, 1}}, []*Target{x, y})
	for range 10 {
		c := bal.Pick()
		if c.Len() != 4 {
			t.Fatalf("Len %d, want 4", c.Len())
		}
		var got []*Target
		for tg := c.Next(); tg != nil; tg = c.Next() {
			got = append(got, tg)
		}
		if len(got) != 4 || got[0] == got[1] || got[0] == x || got[0] == y || got[1] == x || got[1] == y || got[2] != x || got[3] != y {
			t.Fatalf("cursor offered %v", got)
		}
	}
	if live := bal.Live(); len(live) != 2 {
		t.Fatalf("Live %d targets, want the set's 2", len(live))
	}
}
