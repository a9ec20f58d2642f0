"""The contract between the core and chain families (docs/chains.md).

- :mod:`.scan`: reading a chain (every family): head, block hashes, blocks with the transfers
  to watched addresses, one transaction, balances.
- :mod:`.wallet`: sending (each family owns it): payouts and sweeps planned, signed,
  broadcast, followed and replaced the family's way.
- :mod:`.family`: the family, the per-chain spec it builds from config, and its key scheme.
"""

from .family import Account, ChainContext, ChainFamily, ChainKeys, ChainSpec, KeyScheme
from .scan import (
    AddressFilter,
    Block,
    ChainClient,
    Mempool,
    Transfer,
    TransferKind,
    TxLookup,
    Unspent,
    key_prefixes,
    node_data,
    watched_keys,
)
from .wallet import (
    BroadcastRejected,
    Child,
    Deposit,
    Done,
    Fail,
    Later,
    PayoutIntent,
    Purpose,
    Release,
    Send,
    SignedTx,
    StoredTx,
    SweepCandidate,
    SweepIntent,
    SweepPlan,
    TxState,
    TxStatus,
    Wait,
    Wallet,
    WalletContext,
    WalletState,
)

__all__ = [
    "Account", "AddressFilter", "Block", "BroadcastRejected", "ChainClient", "ChainContext", "ChainFamily",
    "ChainKeys", "ChainSpec", "Child", "Deposit", "Done", "Fail", "KeyScheme", "Later", "Mempool", "PayoutIntent", "Purpose", "Release",
    "Send", "SignedTx", "StoredTx", "SweepCandidate", "SweepIntent", "SweepPlan", "Transfer", "TransferKind",
    "TxLookup", "TxState", "TxStatus", "Unspent", "Wait", "Wallet", "WalletContext", "WalletState", "key_prefixes", "node_data", "watched_keys",
]
