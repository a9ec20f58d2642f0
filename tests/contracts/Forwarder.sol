// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// A contract wallet that pays out in internal calls: what trace-based detection must see.
contract Forwarder {
    /// Pays each recipient its amount out of msg.value (internal value transfers).
    function forward(address payable[] calldata to, uint256[] calldata amounts) external payable {
        require(to.length == amounts.length, "length");
        for (uint256 i = 0; i < to.length; i++) {
            (bool ok, ) = to[i].call{value: amounts[i]}("");
            require(ok, "send failed");
        }
    }

    /// Pays `to` in an inner call, then reverts the whole transaction: nothing may be credited.
    function forwardThenRevert(address payable to) external payable {
        (bool ok, ) = to.call{value: msg.value}("");
        require(ok, "send failed");
        revert("changed my mind");
    }

    /// Pays `to` from a sub-call that reverts while the outer call succeeds: the inner
    /// payment is undone, the transaction is successful; nothing may be credited.
    function forwardInFailingFrame(address payable to) external payable {
        try this.payAndRevert{value: msg.value}(to) {} catch {}
    }

    function payAndRevert(address payable to) external payable {
        (bool ok, ) = to.call{value: msg.value}("");
        require(ok, "send failed");
        revert("inner frame reverts");
    }

    receive() external payable {}
}
