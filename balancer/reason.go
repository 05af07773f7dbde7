package balancer

// Reason says why a target's open connections are wound down (the label of
// rota_connections_closed_total): the pool retires a target that left
// discovery, went down or was drained; a connection past max_conn_age
// retires itself. The zero Reason, Kept, says a target takes connections
// again: wind-downs not begun are called off.
type Reason uint8

// The reasons, in the order Reasons lists them.
const (
	Kept    Reason = iota
	Removed        // the target left discovery
	Down           // the target failed its checks
	Drained        // the target was drained
	MaxAge         // the connection is older than max_conn_age
	// NumReasons sizes an array indexed by Reason.
	NumReasons
)

var reasonNames = [NumReasons]string{"", "removed", "down", "drained", "max_age"}

func (r Reason) String() string { return reasonNames[r] }

// Reasons lists the reasons connections are wound down for.
func Reasons() []Reason { return []Reason{Removed, Down, Drained, MaxAge} }
